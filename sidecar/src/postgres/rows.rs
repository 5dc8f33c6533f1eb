//! Masking of result rows: masked columns (by their origin `table.column`) and the value
//! detectors on every text cell. A row nothing changed in is passed on as it came.

use agentgate_policy::masking::{MaskReport, MaskingProfile};

use super::codec::{Field, Frame, ProtocolError, data_row, parse_data_row};

/// Type OIDs whose binary form is their text: text, varchar, bpchar, name, json, xml,
/// unknown (citext is an extension: its OID varies, so its binary form is masked).
const TEXT_LIKE: [u32; 7] = [25, 1043, 1042, 19, 114, 142, 705];
/// `bytea`: scanned as raw bytes in binary, decoded from hex in text.
const BYTEA: u32 = 17;
/// `jsonb`: in binary, a version byte and then the JSON text.
const JSONB: u32 = 3802;
/// Types whose binary form holds a number, a time or an identifier — nothing a detector
/// looks for: bool, int2/4/8, oid, float4/8, numeric, money, date, time, timetz,
/// timestamp, timestamptz, interval, uuid.
const SCALAR: [u32; 16] = [
    16, 20, 21, 23, 26, 700, 701, 1700, 790, 1082, 1083, 1266, 1114, 1184, 1186, 2950,
];

/// How a column's bytes are read for the detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    /// Text: scanned as it is.
    Text,
    /// `bytea` in text format (`\x` and hex): decoded, scanned, re-encoded.
    HexBytea,
    /// `jsonb` in binary: the text after the version byte.
    JsonbBinary,
    /// A binary number, time or identifier: nothing to scan.
    Scalar,
    /// A binary value the sidecar cannot read (an array, a record, a range, an
    /// extension's type): it cannot be scanned, so it is masked.
    Opaque,
}

impl Coding {
    fn of(field: &Field, format: i16) -> Self {
        match (format, field.type_oid) {
            (0, BYTEA) => Coding::HexBytea,
            (0, _) => Coding::Text,
            (_, t) if TEXT_LIKE.contains(&t) || t == BYTEA => Coding::Text,
            (_, JSONB) => Coding::JsonbBinary,
            (_, t) if SCALAR.contains(&t) => Coding::Scalar,
            _ => Coding::Opaque,
        }
    }
}

/// How one result column is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// The whole value is replaced.
    pub masked: bool,
    /// How its bytes are read.
    pub coding: Coding,
}

impl Column {
    /// `origin` is `table.column` when the column comes straight from a table.
    pub(crate) fn new(
        field: &Field,
        format: i16,
        origin: Option<&str>,
        profile: &MaskingProfile,
    ) -> Self {
        let masked = match origin {
            Some(o) => profile.masks_column(o),
            // An expression (or a table the catalog could not name): by its output name
            // under any table, so `*.ssn` still covers `SELECT lower(ssn) AS ssn`.
            None => profile.masks_column(&format!("?.{}", field.name)),
        };
        let coding = Coding::of(field, format);
        Self {
            masked: masked
                || (coding == Coding::Opaque && (!profile.is_empty() || profile.masks_columns())),
            coding,
        }
    }

    /// A column masked whatever its name (its origin could not be looked up, or it is
    /// a whole row of a table).
    pub(crate) fn masked(field: &Field, format: i16) -> Self {
        Self {
            masked: true,
            coding: Coding::of(field, format),
        }
    }
}

/// The row with masked values replaced, or `None` when nothing in it changed. Masked
/// cells of a binary, non-text type become NULL: their bytes cannot be rewritten into a
/// valid value, and must not pass.
pub(crate) fn mask_row(
    columns: &[Column],
    profile: &MaskingProfile,
    body: &[u8],
    report: &mut MaskReport,
) -> Result<Option<Frame>, ProtocolError> {
    let cells = parse_data_row(body)?;
    let mut changed: Vec<Option<Option<Vec<u8>>>> = vec![None; cells.len()];
    let mut any = false;
    for (i, cell) in cells.iter().enumerate() {
        let Some(value) = cell else { continue };
        // More cells than described columns: treat the extra ones as masked.
        let column = columns.get(i).cloned().unwrap_or(Column {
            masked: true,
            coding: Coding::Opaque,
        });
        if column.masked {
            report.add("column");
            let replacement = profile.replacement_for("column", value);
            changed[i] = Some(match column.coding {
                Coding::Text => Some(replacement.into_bytes()),
                Coding::HexBytea => Some(format!("\\x{}", hex::encode(replacement)).into_bytes()),
                // A binary value cannot be rewritten into a valid one: NULL.
                _ => None,
            });
            any = true;
            continue;
        }
        let masked = match column.coding {
            Coding::Text => detected(profile, value, report),
            Coding::HexBytea => mask_hex_bytea(value, profile, report),
            Coding::JsonbBinary => value.split_first().and_then(|(version, json)| {
                detected(profile, json, report).map(|m| [&[*version][..], &m].concat())
            }),
            Coding::Scalar | Coding::Opaque => None,
        };
        if let Some(m) = masked {
            changed[i] = Some(Some(m));
            any = true;
        }
    }
    if !any {
        return Ok(None);
    }
    let out = cells.iter().zip(&changed).map(|(cell, new)| match new {
        Some(v) => v.as_deref(),
        None => *cell,
    });
    Ok(Some(data_row(out.collect::<Vec<_>>().into_iter())))
}

/// A text-format `bytea` (`\x` + hex): the detectors see the bytes it stands for, so
/// `convert_to(secret, 'UTF8')` is no way around them. A value that is not valid hex
/// (the `escape` output format) is scanned as it is.
fn mask_hex_bytea(
    value: &[u8],
    profile: &MaskingProfile,
    report: &mut MaskReport,
) -> Option<Vec<u8>> {
    let decoded = value
        .strip_prefix(b"\\x")
        .and_then(|hex_digits| hex::decode(hex_digits).ok());
    let Some(decoded) = decoded else {
        return detected(profile, value, report);
    };
    detected(profile, &decoded, report).map(|m| format!("\\x{}", hex::encode(m)).into_bytes())
}

/// `bytes` with what the detectors found replaced, or `None` when they found nothing.
fn detected(profile: &MaskingProfile, bytes: &[u8], report: &mut MaskReport) -> Option<Vec<u8>> {
    match profile.mask_bytes(bytes, report) {
        std::borrow::Cow::Owned(m) => Some(m),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_crds::{DetectorSet, Masking};

    fn profile() -> MaskingProfile {
        let spec = Masking {
            detectors: vec![DetectorSet::Secrets],
            columns: vec!["customers.email".into(), "*.ssn".into()],
            ..Default::default()
        };
        MaskingProfile::compile(&spec, b"k").unwrap()
    }

    fn field(name: &str, type_oid: u32) -> Field {
        Field {
            name: name.into(),
            table_oid: 0,
            column: 0,
            type_oid,
            format: 0,
        }
    }

    #[test]
    fn columns_detectors_nulls_and_binary() {
        let p = profile();
        let cols = [
            Column::new(&field("e", 25), 0, Some("customers.email"), &p),
            Column::new(&field("ssn", 25), 0, None, &p),
            Column::new(&field("note", 25), 0, Some("customers.note"), &p),
            Column::new(&field("n", 23), 1, Some("customers.email"), &p),
            Column::new(&field("id", 23), 0, Some("customers.id"), &p),
        ];
        let key = b"AKIAIOSFODNN7EXAMPLE";
        let row = data_row(
            [
                Some(&b"a@b.c"[..]),
                Some(&b"123-45-6789"[..]),
                Some(&key[..]),
                Some(&[0, 0, 0, 7][..]),
                None,
            ]
            .into_iter(),
        );
        let mut report = MaskReport::default();
        let masked = mask_row(&cols, &p, &row.body, &mut report)
            .unwrap()
            .unwrap();
        let cells = parse_data_row(&masked.body).unwrap();
        assert_eq!(cells[0], Some(&b"[masked:column]"[..]));
        assert_eq!(cells[1], Some(&b"[masked:column]"[..]));
        assert!(!cells[2].unwrap().windows(key.len()).any(|w| w == key));
        assert_eq!(cells[3], None, "a masked binary int becomes NULL");
        assert_eq!(cells[4], None, "NULL stays NULL");
        assert_eq!(report.counts().get("column"), Some(&3));

        let plain = data_row([Some(&b"hello"[..]), None].into_iter());
        assert_eq!(
            mask_row(&cols[2..], &p, &plain.body, &mut report).unwrap(),
            None
        );
    }

    #[test]
    fn what_cannot_be_scanned_is_masked_and_bytea_is_scanned_decoded() {
        let p = profile();
        let key = "AKIAIOSFODNN7EXAMPLE";
        let cols = [
            // text[] in binary: cannot be scanned
            Column::new(&field("a", 1009), 1, Some("t.a"), &p),
            // bytea in text format: hex
            Column::new(&field("b", 17), 0, Some("t.b"), &p),
            // bytea in binary: raw bytes
            Column::new(&field("c", 17), 1, Some("t.c"), &p),
            // jsonb in binary: version byte + text
            Column::new(&field("j", 3802), 1, Some("t.j"), &p),
            // int4 in binary: passes
            Column::new(&field("n", 23), 1, Some("t.n"), &p),
        ];
        assert_eq!(cols[0].coding, Coding::Opaque);
        assert!(cols[0].masked);
        assert!(!cols[4].masked);
        let hex_key = format!("\\x{}", hex::encode(key));
        let jsonb = [&[1u8][..], format!("{{\"k\": \"{key}\"}}").as_bytes()].concat();
        let row = data_row(
            [
                Some(&b"opaque"[..]),
                Some(hex_key.as_bytes()),
                Some(key.as_bytes()),
                Some(&jsonb[..]),
                Some(&[0, 0, 0, 7][..]),
            ]
            .into_iter(),
        );
        let mut report = MaskReport::default();
        let masked = mask_row(&cols, &p, &row.body, &mut report)
            .unwrap()
            .unwrap();
        let cells = parse_data_row(&masked.body).unwrap();
        assert_eq!(cells[0], None, "an unscannable binary value becomes NULL");
        let b = std::str::from_utf8(cells[1].unwrap()).unwrap();
        assert!(b.starts_with("\\x"), "still a bytea: {b}");
        let decoded = hex::decode(&b[2..]).unwrap();
        assert!(
            !String::from_utf8_lossy(&decoded).contains(key),
            "hex bytea was scanned"
        );
        assert!(!String::from_utf8_lossy(cells[2].unwrap()).contains(key));
        let j = cells[3].unwrap();
        assert_eq!(j[0], 1, "jsonb keeps its version byte");
        assert!(!String::from_utf8_lossy(j).contains(key));
        assert_eq!(cells[4], Some(&[0, 0, 0, 7][..]));
    }
}
