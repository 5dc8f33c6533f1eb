use super::*;

#[test]
fn locations_parse_for_azure_and_for_an_emulator() {
    let azure =
        BlobLocation::parse("https://myaccount.blob.core.windows.net/audit/agents/claude-1a2b")
            .unwrap();
    assert_eq!(azure.account, "myaccount");
    assert_eq!(azure.container_path, "/audit");
    assert_eq!(azure.prefix, "agents/claude-1a2b");
    assert_eq!(azure.blob_path(7), "/audit/agents/claude-1a2b-00007.jsonl");
    assert_eq!(
        azure.to_string(),
        "https://myaccount.blob.core.windows.net/audit/agents/claude-1a2b"
    );
    let azurite =
        BlobLocation::parse("http://127.0.0.1:10000/devstoreaccount1/audit/trail").unwrap();
    assert_eq!(azurite.account, "devstoreaccount1");
    assert_eq!(azurite.origin, "http://127.0.0.1:10000");
    assert_eq!(
        azurite.blob_path(1),
        "/devstoreaccount1/audit/trail-00001.jsonl"
    );
    for bad in [
        // Plain http beyond loopback.
        "http://myaccount.blob.core.windows.net/audit/p",
        // A SAS: refused, and not repeated.
        "https://myaccount.blob.core.windows.net/audit/p?sv=2021-12-02&sig=s3cret",
        "https://acct:s3cret@myaccount.blob.core.windows.net/audit/p",
        "https://myaccount.blob.core.windows.net/Audit/p",
        "https://myaccount.blob.core.windows.net/audit",
        "https://myaccount.blob.core.windows.net/audit/a//b",
        "https://myaccount.blob.core.windows.net/audit/a b",
        "https://127.0.0.1:10000/audit",
        "ftp://myaccount.blob.core.windows.net/audit/p",
    ] {
        let err = BlobLocation::parse(bad).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}

#[test]
fn blob_names_are_numbered_under_the_prefix() {
    assert_eq!(blob_name("a/b", 1), "a/b-00001.jsonl");
    assert_eq!(blob_index("a/b", "a/b-00001.jsonl"), Some(1));
    assert_eq!(blob_index("a/b", "a/b-123456.jsonl"), Some(123_456));
    for other in [
        "a/b-1.jsonl",
        "a/b-0000x.jsonl",
        "a/bc-00001.jsonl",
        "a/b-00001.json",
    ] {
        assert_eq!(blob_index("a/b", other), None, "{other}");
    }
}

#[test]
fn requests_are_signed_as_azure_documents_shared_key() {
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from_static("12"));
    headers.insert(
        "x-ms-date",
        HeaderValue::from_static("Fri, 26 Jun 2015 23:39:12 GMT"),
    );
    headers.insert("x-ms-version", HeaderValue::from_static("2021-12-02"));
    headers.insert(
        "x-ms-blob-condition-appendpos",
        HeaderValue::from_static("100"),
    );
    let signed = string_to_sign(
        &Method::PUT,
        &headers,
        "myaccount",
        "/mycontainer/audit/pod-00001.jsonl",
        &[("comp", "appendblock")],
    );
    assert_eq!(
        signed,
        "PUT\n\n\n12\n\n\n\n\n\n\n\n\n\
         x-ms-blob-condition-appendpos:100\n\
         x-ms-date:Fri, 26 Jun 2015 23:39:12 GMT\n\
         x-ms-version:2021-12-02\n\
         /myaccount/mycontainer/audit/pod-00001.jsonl\ncomp:appendblock"
    );
    // The HMAC-SHA256 of that, as Python's hmac computes it with the same key.
    let key = AccountKey(
        base64::engine::general_purpose::STANDARD
            .decode("YWdlbnRnYXRlLXRlc3QtYWNjb3VudC1rZXktMDEyMzQ1Njc4OQ==")
            .unwrap(),
    );
    let value = authorization(&key, "myaccount", &signed);
    assert_eq!(
        value.to_str().unwrap(),
        "SharedKey myaccount:KSE66hfFxPgUi7DzxIA/9hGJe2QILEh1Hj5sS3aCEQ4="
    );
    assert!(value.is_sensitive());
    assert_eq!(format!("{key:?}"), "AccountKey([redacted])");

    // Content-Length 0 signs as empty; query parameters are sorted, values decoded.
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from_static("0"));
    headers.insert("if-none-match", HeaderValue::from_static("*"));
    headers.insert("x-ms-version", HeaderValue::from_static("2021-12-02"));
    let signed = string_to_sign(
        &Method::GET,
        &headers,
        "acct",
        "/acct/audit",
        &[
            ("restype", "container"),
            ("comp", "list"),
            ("prefix", "a/b-"),
            ("marker", "2!8!x+y="),
        ],
    );
    assert_eq!(
        signed,
        "GET\n\n\n\n\n\n\n\n\n*\n\n\nx-ms-version:2021-12-02\n/acct/acct/audit\ncomp:list\nmarker:2!8!x+y=\nprefix:a/b-\nrestype:container"
    );
    assert_eq!(encode_query("2!8!x+y= /"), "2%218%21x%2By%3D%20%2F");
}

#[test]
fn a_key_file_is_read_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, "c2VjcmV0LWtleQ==\n").unwrap();
    assert_eq!(AccountKey::read(&path).unwrap().0, b"secret-key");
    std::fs::write(&path, "not base64: s3cret!").unwrap();
    let err = AccountKey::read(&path).unwrap_err();
    assert!(!err.contains("s3cret"), "{err}");
    assert!(AccountKey::read(&dir.path().join("missing")).is_err());
}

#[test]
fn blocks_end_at_line_ends_unless_a_line_is_longer() {
    let data = b"aaa\nbbbb\ncc\n";
    assert_eq!(blocks(data, 100), vec![0..12]);
    assert_eq!(blocks(data, 9), vec![0..9, 9..12]);
    assert_eq!(blocks(data, 5), vec![0..4, 4..9, 9..12]);
    // A line longer than a block is split.
    assert_eq!(blocks(b"abcdefgh\nx\n", 3), vec![0..3, 3..6, 6..9, 9..11]);
    // Data that starts mid-line (the rest of a cut event) ends that line first.
    assert_eq!(blocks(b"fgh\nxy\n", 6), vec![0..4, 4..7]);
    assert!(blocks(b"", 4).is_empty());
}

#[test]
fn a_list_answer_gives_names_and_the_next_marker() {
    let xml = r#"<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://x/" ContainerName="audit"><Prefix>p-</Prefix><Blobs><Blob><Name>p-00001.jsonl</Name><Properties><Content-Length>10</Content-Length></Properties></Blob><Blob><Name>p-00002.jsonl</Name></Blob><Blob><Name>p-&amp;.jsonl</Name></Blob></Blobs><NextMarker>2!72!MDAw&amp;</NextMarker></EnumerationResults>"#;
    let (names, marker) = parse_list(xml);
    assert_eq!(names, vec!["p-00001.jsonl", "p-00002.jsonl"]);
    assert_eq!(marker.as_deref(), Some("2!72!MDAw&"));
    let (_, marker) = parse_list("<Blobs></Blobs><NextMarker />");
    assert_eq!(marker, None);
    let (_, marker) = parse_list("<Blobs></Blobs><NextMarker></NextMarker>");
    assert_eq!(marker, None);
}

#[test]
fn a_tail_gives_the_last_whole_line_and_what_follows() {
    let tail = split_tail(b"x\nline-1\nline-2\npart", false).unwrap();
    assert_eq!(tail.line, Some(&b"line-2"[..]));
    assert_eq!(tail.partial, b"part");
    let tail = split_tail(b"line-1\n", true).unwrap();
    assert_eq!(tail.line, Some(&b"line-1"[..]));
    assert!(tail.partial.is_empty());
    // Not the whole blob, and the line may start before the window: read more.
    assert_eq!(split_tail(b"ne-1\n", false), None);
    assert_eq!(split_tail(b"partial", false), None);
    let tail = split_tail(b"partial", true).unwrap();
    assert_eq!(tail.line, None);
    assert_eq!(tail.partial, b"partial");
}

#[test]
fn hashes_are_read_from_spool_lines() {
    use agentgate_crds::audit::{AuditEvent, Head, chain_line};
    let (one, head) = chain_line(&Head::genesis(), "t".into(), &AuditEvent::default()).unwrap();
    let (two, _) = chain_line(&head, "t".into(), &AuditEvent::default()).unwrap();
    let (one, two) = (one.trim_end(), two.trim_end());
    assert_eq!(hash_of(one), Some(head.hash.as_str()));
    assert_eq!(prev_hash_of(two), Some(head.hash.as_str()));
    assert_eq!(prev_hash_of(one), Some(agentgate_crds::audit::GENESIS));
}
