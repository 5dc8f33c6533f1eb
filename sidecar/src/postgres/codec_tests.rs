use proptest::prelude::*;

use super::*;

fn frames(bytes: &[u8], max: usize) -> Result<Vec<Frame>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf, max)? {
        out.push(f);
    }
    Ok(out)
}

#[test]
fn startup_ssl_cancel_and_parameters() {
    let mut buf = startup_packet(SSL_REQUEST, &[]);
    assert_eq!(decode_startup(&mut buf, 1024), Ok(Some(Startup::Ssl)));
    assert!(buf.is_empty());
    let mut buf = startup_packet(CANCEL_REQUEST, &[0, 0, 0, 7, 1, 2, 3, 4]);
    assert_eq!(
        decode_startup(&mut buf, 1024),
        Ok(Some(Startup::Cancel {
            pid: 7,
            key: Bytes::from_static(&[1, 2, 3, 4])
        }))
    );
    let mut buf = startup_message(&[("user", "agent"), ("database", "orders")]);
    let whole = buf.clone();
    // Incomplete: nothing taken yet.
    let mut part = BytesMut::from(&whole[..whole.len() - 1]);
    assert_eq!(decode_startup(&mut part, 1024), Ok(None));
    assert_eq!(
        decode_startup(&mut buf, 1024),
        Ok(Some(Startup::Startup {
            version: PROTOCOL_3_0,
            params: vec![
                ("user".into(), "agent".into()),
                ("database".into(), "orders".into())
            ]
        }))
    );
    let mut v2 = startup_packet(2 << 16, &[0]);
    assert_eq!(
        decode_startup(&mut v2, 1024),
        Err(ProtocolError::UnsupportedVersion(2 << 16))
    );
}

#[test]
fn lengths_are_checked_before_anything_is_reserved() {
    let mut huge = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        decode_frame(&mut huge, 1 << 20),
        Err(ProtocolError::TooLarge { .. })
    ));
    assert!(huge.capacity() < 1 << 20);
    let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
    assert_eq!(
        decode_frame(&mut short, 1024),
        Err(ProtocolError::BadLength(3))
    );
    let mut negative = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    assert_eq!(
        decode_startup(&mut negative, 1024),
        Err(ProtocolError::BadLength(-1))
    );
}

#[test]
fn extended_protocol_messages() {
    let mut body = BytesMut::new();
    body.put_slice(b"p1\0s1\0");
    body.put_i16(1);
    body.put_i16(0);
    body.put_i16(2);
    body.put_i32(3);
    body.put_slice(b"abc");
    body.put_i32(-1);
    body.put_i16(1);
    body.put_i16(1);
    assert_eq!(
        parse_frontend(&Frame::new(b'B', body)),
        Ok(Frontend::Bind {
            portal: "p1".into(),
            statement: "s1".into(),
            param_formats: vec![0],
            params: vec![Some(Bytes::from_static(b"abc")), None],
            result_formats: vec![1],
        })
    );
    let mut parse = BytesMut::from(&b"s1\0SELECT $1\0"[..]);
    parse.put_i16(1);
    parse.put_i32(23);
    assert_eq!(
        parse_frontend(&Frame::new(b'P', parse)),
        Ok(Frontend::Parse {
            name: "s1".into(),
            query: "SELECT $1".into()
        })
    );
    assert_eq!(
        parse_frontend(&Frame::new(b'D', &b"Pp1\0"[..])),
        Ok(Frontend::Describe {
            target: b'P',
            name: "p1".into()
        })
    );
    assert!(parse_frontend(&Frame::new(b'D', &b"Xp1\0"[..])).is_err());
    assert!(parse_frontend(&Frame::new(b'B', &b"p1\0s1\0\xff\xff"[..])).is_err());
}

#[test]
fn rows_from_command_tags() {
    assert_eq!(rows_modified("INSERT 0 5", false), Some(5));
    assert_eq!(rows_modified("UPDATE 3", false), Some(3));
    assert_eq!(rows_modified("DELETE 0", false), Some(0));
    assert_eq!(rows_modified("COPY 10", true), Some(10));
    assert_eq!(rows_modified("COPY 10", false), None);
    assert_eq!(rows_modified("SELECT 4", false), None);
    assert_eq!(rows_returned("SELECT 4"), Some(4));
    assert_eq!(rows_returned("CREATE TABLE"), None);
}

#[test]
fn errors_carry_code_message_and_hint() {
    let e = error_response("42501", "denied\0here", Some("ask"));
    let fields = parse_notice_fields(&e.body);
    assert!(fields.contains(&(b'C', "42501".into())));
    assert!(fields.contains(&(b'M', "denied here".into())));
    assert!(fields.contains(&(b'H', "ask".into())));
}

proptest! {
    /// Any bytes: framing never panics, and what it returns re-encodes to a prefix of the
    /// input.
    #[test]
    fn framing_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frames) = frames(&bytes, 256) {
            let mut out = BytesMut::new();
            for f in &frames {
                f.encode(&mut out);
                let _ = parse_frontend(f);
                let _ = parse_row_description(&f.body);
                let _ = parse_data_row(&f.body);
                let _ = parse_notice_fields(&f.body);
            }
            prop_assert!(bytes.starts_with(&out));
        }
        let _ = decode_startup(&mut BytesMut::from(&bytes[..]), 256);
    }

    /// Frames split anywhere decode to the same frames.
    #[test]
    fn chunking_does_not_matter(
        bodies in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        cut in 0usize..1024,
    ) {
        let sent: Vec<Frame> = bodies.into_iter().map(|(t, b)| Frame::new(t, b)).collect();
        let mut wire = BytesMut::new();
        for f in &sent {
            f.encode(&mut wire);
        }
        let cut = cut.min(wire.len());
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = Vec::new();
        while let Some(f) = decode_frame(&mut buf, 1024).unwrap() {
            got.push(f);
        }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(f) = decode_frame(&mut buf, 1024).unwrap() {
            got.push(f);
        }
        prop_assert_eq!(got, sent);
    }

    /// DataRow encoding and decoding agree, NULLs included.
    #[test]
    fn data_rows_round_trip(cells in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)), 0..16)) {
        let frame = data_row(cells.iter().map(|c| c.as_deref()));
        let back = parse_data_row(&frame.body).unwrap();
        prop_assert_eq!(back, cells.iter().map(|c| c.as_deref()).collect::<Vec<_>>());
    }
}
