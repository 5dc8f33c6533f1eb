//! `crdgen DIR...`: writes every agentgate CRD manifest into each DIR (the crate's
//! `manifests/` and the Helm chart's `crds/`), replacing what was there.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() || dirs.iter().any(|d| d == "--help" || d == "-h") {
        eprintln!(
            "usage: crdgen DIR [DIR...]\nwrites <plural>.agentgate.dev.yaml for every agentgate CRD into each DIR"
        );
        return if dirs.is_empty() {
            ExitCode::from(64)
        } else {
            ExitCode::SUCCESS
        };
    }
    let crds = match agentgate_crds::all_crds() {
        Ok(crds) => crds,
        Err(e) => {
            eprintln!("crdgen: cannot generate the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    for crd in crds {
        let manifest = match agentgate_crds::render_manifest(&crd) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("crdgen: cannot render {:?}: {e}", crd.metadata.name);
                return ExitCode::FAILURE;
            }
        };
        for dir in &dirs {
            let path = dir.join(&manifest.file_name);
            if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &manifest.yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
