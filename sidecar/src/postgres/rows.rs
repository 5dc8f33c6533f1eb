//! Masking of result rows: masked columns (by their origin `table.column`) and the value
//! detectors on every text cell. A row nothing changed in is passed on as it came.

use agentgate_policy::masking::{MaskReport, MaskingProfile};

use super::codec::{Field, Frame, ProtocolError, data_row, parse_data_row};

/// Type OIDs whose binary form is their text: text, varchar, bpchar, name, json, xml,
/// unknown, citext is an extension (not listed: its binary form is also text, but its
/// OID varies).
const TEXT_LIKE: [u32; 7] = [25, 1043, 1042, 19, 114, 142, 705];

/// How one result column is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// The whole value is replaced.
    pub masked: bool,
    /// The value's bytes are text (text format, or a text-like type in binary).
    pub text: bool,
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
        Self {
            masked,
            text: format == 0 || TEXT_LIKE.contains(&field.type_oid),
        }
    }
}

impl Column {
    /// A column masked whatever its name (its origin could not be looked up).
    pub(crate) fn masked(field: &Field, format: i16) -> Self {
        Self {
            masked: true,
            text: format == 0 || TEXT_LIKE.contains(&field.type_oid),
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
        // More cells than described columns: treat the extra ones as masked text.
        let column = columns.get(i).cloned().unwrap_or(Column {
            masked: true,
            text: true,
        });
        if column.masked {
            report.add("column");
            changed[i] = Some(
                column
                    .text
                    .then(|| profile.replacement_for("column", value).into_bytes()),
            );
            any = true;
        } else if column.text
            && let std::borrow::Cow::Owned(masked) = profile.mask_bytes(value, report)
        {
            changed[i] = Some(Some(masked));
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
}
