//! Unit tests of the stored bytes: every format a release wrote, sealing, and what a reader
//! without the key learns.

use super::*;

/// A session as release 0.1 (format 1, no version byte) wrote it, byte for byte.
fn v1_session() -> Vec<u8> {
    let mut raw = vec![b'S'];
    raw.extend_from_slice(&5_000i64.to_be_bytes());
    raw.extend_from_slice(
        br#"{"data":{"n":1},"created":1,"saved":2,"accessed":3,"expiry":"Default","subject":"u1","deadline":5000}"#,
    );
    raw
}

#[test]
fn format_1_records_still_read() {
    let Entry::Session(r) = Entry::decode(&v1_session()).unwrap() else {
        panic!("a session")
    };
    assert_eq!(r.data["n"], 1);
    assert_eq!(r.subject.as_deref(), Some("u1"));
    assert_eq!(r.deadline, 5000);
    let mut moved = vec![b'M'];
    moved.extend_from_slice(&9i64.to_be_bytes());
    moved.extend_from_slice(br#"{"to":"abc","until":9}"#);
    assert!(matches!(Entry::decode(&moved).unwrap(), Entry::Moved(m) if m.to == "abc"));
}

#[test]
fn written_records_carry_the_version_and_round_trip() {
    let mut r = Record::new(7);
    r.data.insert("k".into(), serde_json::json!("v"));
    let raw = Entry::Session(r.clone()).encode();
    assert_eq!(raw[9], FORMAT_VERSION);
    let Entry::Session(back) = Entry::decode(&raw).unwrap() else {
        panic!("a session")
    };
    assert_eq!(back, r);
}

#[test]
fn fields_added_or_missing_do_not_make_a_record_corrupt() {
    let mut raw = vec![b'S'];
    raw.extend_from_slice(&5_000i64.to_be_bytes());
    raw.push(FORMAT_VERSION);
    raw.extend_from_slice(br#"{"data":{"n":1},"deadline":5000,"a_future_field":[1,2]}"#);
    let Entry::Session(r) = Entry::decode(&raw).unwrap() else {
        panic!("a session")
    };
    assert_eq!(r.data["n"], 1);
    assert_eq!(r.subject, None);
}

#[test]
fn a_newer_format_is_named_not_misread() {
    let mut raw = Entry::Session(Record::new(0)).encode();
    raw[9] = FORMAT_NAMED_SEALED + 1;
    assert!(Entry::decode(&raw).unwrap_err().contains("newer"));
}

fn visitor() -> Entry {
    let mut r = Record::new(7);
    r.data
        .insert("cart".into(), serde_json::json!(["red shoes", 2]));
    r.subject = Some("alice".into());
    r.deadline = 99_000;
    Entry::Session(r)
}

fn session(e: Entry) -> Record {
    let Entry::Session(r) = e else {
        panic!("a session")
    };
    r
}

#[test]
fn a_sealed_record_shows_no_data_and_opens_only_under_its_key_and_head() {
    let codec = Codec::sealed("a secret of the operator's, 32 bytes or more", &[]);
    let raw = codec.encode("k1", &visitor());
    assert_eq!(raw[9], FORMAT_NAMED_SEALED);
    for word in ["red shoes", "cart", "alice"] {
        assert!(
            !raw.windows(word.len()).any(|w| w == word.as_bytes()),
            "{word} readable"
        );
    }
    // The head stays readable for the sweeper and the liveness check.
    assert_eq!(Head::read(&raw), Ok(Head::Session { deadline: 99_000 }));
    assert_eq!(
        session(codec.decode("k1", &raw).unwrap()),
        session(visitor())
    );
    // Copied under another key, or given a later deadline, it does not open.
    assert!(matches!(
        codec.decode("k2", &raw),
        Err(DecodeError::Unopened(_))
    ));
    let mut later = raw.clone();
    later[1..9].copy_from_slice(&999_000i64.to_be_bytes());
    assert!(matches!(
        codec.decode("k1", &later),
        Err(DecodeError::Unopened(_))
    ));
    // Every byte after the head is authenticated.
    for i in 10..raw.len() {
        let mut bent = raw.clone();
        bent[i] ^= 0x01;
        assert!(codec.decode("k1", &bent).is_err(), "byte {i} altered");
    }
    // Two seals of the same record differ (random nonce).
    assert_ne!(codec.encode("k1", &visitor()), raw);
}

#[test]
fn rotation_plain_records_and_a_lost_secret() {
    let old = Codec::sealed("the old secret, long enough to be a real one", &[]);
    let raw_old = old.encode("k", &visitor());
    let rotated = Codec::sealed(
        "the new secret, long enough to be a real one",
        &["the old secret, long enough to be a real one".into()],
    );
    assert_eq!(
        session(rotated.decode("k", &raw_old).unwrap()),
        session(visitor())
    );
    let raw_new = rotated.encode("k", &visitor());
    assert!(matches!(
        old.decode("k", &raw_new),
        Err(DecodeError::Unopened(_))
    ));
    // Written before encryption was turned on: still read, sealed at the next write.
    let plain = Entry::encode(&visitor());
    assert_eq!(
        session(rotated.decode("k", &plain).unwrap()),
        session(visitor())
    );
    // Encryption turned off again: sealed records are named, not misread.
    assert!(matches!(
        Codec::plain().decode("k", &raw_new),
        Err(DecodeError::Unopened(m)) if m.contains("no secret_key")
    ));
    let moved = Entry::Moved(Moved {
        to: "next".into(),
        until: 5,
        retired: 0,
    });
    assert!(matches!(
        rotated.decode("k", &rotated.encode("k", &moved)).unwrap(),
        Entry::Moved(m) if m.to == "next"
    ));
}

fn contains(raw: &[u8], word: &str) -> bool {
    raw.windows(word.len()).any(|w| w == word.as_bytes())
}

#[test]
fn a_record_names_neither_its_key_nor_its_subject_nor_its_successor() {
    let key = crate::session::id::generate();
    let next = crate::session::id::generate();
    let secret = "a secret of the operator's, 32 bytes or more";
    for codec in [
        Codec::plain(),
        Codec::unsealed(Some(secret), &[]),
        Codec::sealed(secret, &[]),
    ] {
        let raw = codec.encode(&key, &visitor());
        assert!(is_named(&raw));
        for word in [key.as_str(), "alice"] {
            assert!(!contains(&raw, word), "{word} in {codec:?}");
        }
        // The key's holder reads everything back.
        assert_eq!(
            session(codec.decode(&key, &raw).unwrap()),
            session(visitor())
        );
        // A reader who knows only the digest: the metadata and the subject's digest.
        let digest = crate::session::id::digest(&key);
        let keyless = codec.read(Reader::Digest(&digest), &raw).unwrap();
        let Entry::Session(r) = keyless.entry else {
            panic!("a session")
        };
        assert_eq!((r.subject, r.created), (None, 7));
        assert_eq!(keyless.tag, Some(codec.tag("alice")));
        // A forward names its successor by digest; the old key's holder finds it.
        let moved = Entry::Moved(Moved {
            to: next.clone(),
            until: 5,
            retired: 9,
        });
        let raw = codec.encode(&key, &moved);
        assert!(!contains(&raw, &next));
        let Entry::Moved(m) = codec.decode(&key, &raw).unwrap() else {
            panic!("a forward")
        };
        assert_eq!((m.to.as_str(), m.until, m.retired), (next.as_str(), 5, 9));
        let Entry::Moved(m) = codec.read(Reader::Digest(&digest), &raw).unwrap().entry else {
            panic!("a forward")
        };
        assert!(m.to.is_empty(), "no successor without the old key");
    }
}

#[test]
fn subject_digests_are_keyed_by_the_secret_and_rotate() {
    let plain = Codec::plain();
    let old = Codec::unsealed(Some("the old secret, long enough"), &[]);
    let new = Codec::unsealed(
        Some("the new secret, long enough"),
        &["the old secret, long enough".into()],
    );
    assert_ne!(plain.tag("alice"), old.tag("alice"));
    assert_ne!(old.tag("alice"), new.tag("alice"));
    assert_ne!(old.tag("alice"), old.tag("bob"));
    let all = new.tags("alice");
    assert_eq!(all[0], new.tag("alice"));
    assert!(all.contains(&old.tag("alice")) && all.contains(&plain.tag("alice")));
}

#[test]
fn legacy_mode_writes_what_the_release_before_wrote() {
    let legacy = Codec::plain().with_legacy_names(true);
    let raw = legacy.encode("k", &visitor());
    assert_eq!(raw[9], FORMAT_VERSION);
    assert!(contains(&raw, "alice"), "the subject in clear, as before");
    let sealed =
        Codec::sealed("a secret of the operator's, 32 bytes or more", &[]).with_legacy_names(true);
    assert_eq!(sealed.encode("k", &visitor())[9], FORMAT_SEALED);
    // And a release in the default mode reads both.
    assert_eq!(
        session(Codec::plain().decode("k", &raw).unwrap()),
        session(visitor())
    );
}
