//! k-of-n key shares: the tenant's key material split with Shamir's scheme over GF(256)
//! (the `blahaj` crate; never `sharks`, RUSTSEC-2024-0398), each share a text a person can
//! print, keep in a safe and type back in. Any k shares rebuild the key file; k-1 tell nothing.
//!
//! A share's payload (bytes):
//!
//! ```text
//! offset  size  field
//! 0       1     kind: 1 plain, 2 sealed under its holder's passphrase
//! 1       1     threshold k
//! 2       1     count n
//! 3       1     share number x (1..=n)
//! 4       4     split id (random; the same in every share of one split)
//! 8       8     key fingerprint
//! 16      8     key material check (names the exact epochs split; see `keys`)
//! 24      1     tenant length t
//! 25      t     tenant
//! 25+t    m     kind 1: the share's bytes (as long as the encoded material)
//!               kind 2: seal::seal(those bytes, context = payload bytes [0, 25+t))
//! end     4     BLAKE3(every byte before)[..4]
//! ```
//!
//! Text form: a header for people (tenant, key, share x of n, threshold, split, holder), then
//! the payload in Crockford base32 (digits and letters without I, L, O, U; a typed I, L or O is
//! read as 1, 1, 0; case, spaces and dashes do not matter), twenty characters a line in groups
//! of four, each line numbered and ending in a two-character check of its number and content,
//! so a mistyped group is named by its line. The header is checked against the payload.
//!
//! Shares of two splits of the same key never combine (the polynomials differ): the split id
//! says so before any arithmetic. Shares are never written to the cluster.

use zeroize::Zeroizing;

use super::seal::{self, KdfParams, SealError};
use super::{KeyMaterial, TenantKeys};

const KIND_PLAIN: u8 = 1;
const KIND_SEALED: u8 = 2;
const TITLE: &str = "EXCLAVE KEY SHARE";
pub const SHARE_FORMAT: &str = "exclave-share-v1";
const ALPHABET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LINE_CHARS: usize = 20;
const GROUP: usize = 4;
const CTX_LINE: &str = "exclave 2026-11 share line check v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("{0}")]
    Damaged(String),
    #[error("{given} share(s) of {tenant}'s key given, {need} needed: {} more", need - given)]
    NotEnough { tenant: String, given: usize, need: usize },
    #[error("share {number} is given twice ({first} and {second}); each share counts once")]
    Duplicate { number: u8, first: String, second: String },
    #[error("{first} and {second} are shares of different keys ({first}: {a}; {second}: {b})")]
    DifferentKeys { first: String, second: String, a: String, b: String },
    #[error(
        "{first} and {second} come from different splits of the key (split {a} and {b}): after a rotation or a new split, \
         use shares of one split only"
    )]
    DifferentSplits { first: String, second: String, a: String, b: String },
    #[error("{0} is sealed under its holder's passphrase")]
    Sealed(String),
    #[error("wrong passphrase for {0}")]
    WrongPassphrase(String),
    #[error("the shares do not rebuild the key they name (key {want}): a share is damaged or forged")]
    Rebuilt { want: String },
    #[error("{0}")]
    Usage(String),
}

/// What a share says of itself (readable without its holder's passphrase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareInfo {
    pub sealed: bool,
    pub threshold: u8,
    pub count: u8,
    pub number: u8,
    pub split: String,
    pub fingerprint: String,
    pub check: String,
    pub tenant: String,
}

impl ShareInfo {
    fn describe(&self) -> String {
        format!("tenant {}, key {}", self.tenant, self.fingerprint)
    }

    fn header_bytes(&self) -> Result<Vec<u8>, ShareError> {
        let damaged = |w: &str| ShareError::Damaged(format!("{w} is not valid"));
        let mut b = vec![if self.sealed { KIND_SEALED } else { KIND_PLAIN }, self.threshold, self.count, self.number];
        b.extend(hex::decode(&self.split).map_err(|_| damaged("split id"))?);
        b.extend(hex::decode(&self.fingerprint).map_err(|_| damaged("fingerprint"))?);
        b.extend(hex::decode(&self.check).map_err(|_| damaged("material check"))?);
        let t = u8::try_from(self.tenant.len()).map_err(|_| damaged("tenant"))?;
        b.push(t);
        b.extend_from_slice(self.tenant.as_bytes());
        Ok(b)
    }
}

/// One share: its description and its bytes (plain, or sealed under its holder's passphrase).
#[derive(Clone)]
pub struct Share {
    pub info: ShareInfo,
    body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share({:?})", self.info)
    }
}

/// Splits the key material into `count` shares of which any `threshold` rebuild it.
pub fn split(keys: &TenantKeys, threshold: u8, count: u8) -> Result<Vec<Share>, ShareError> {
    use rand::RngCore;
    if threshold < 2 {
        return Err(ShareError::Usage(
            "a threshold below 2 would make every share a copy of the key; use 2 or more".into(),
        ));
    }
    if count < threshold {
        return Err(ShareError::Usage(format!("{count} shares cannot meet a threshold of {threshold}")));
    }
    let material = keys.material();
    let secret = material.to_bytes();
    let mut split = [0u8; 4];
    rand::rng().fill_bytes(&mut split);
    let shares: Vec<blahaj::Share> = blahaj::Sharks(threshold).dealer(&secret).take(count as usize).collect();
    Ok(shares
        .iter()
        .map(|s| {
            let bytes = Zeroizing::new(Vec::<u8>::from(s));
            Share {
                info: ShareInfo {
                    sealed: false,
                    threshold,
                    count,
                    number: bytes[0],
                    split: hex::encode(split),
                    fingerprint: keys.fingerprint.clone(),
                    check: material.check(),
                    tenant: keys.tenant.clone(),
                },
                body: Zeroizing::new(bytes[1..].to_vec()),
            }
        })
        .collect())
}

impl Share {
    /// Seals the share under its holder's passphrase.
    pub fn seal(&self, passphrase: &[u8], params: &KdfParams) -> Result<Share, ShareError> {
        if self.info.sealed {
            return Ok(self.clone());
        }
        let info = ShareInfo { sealed: true, ..self.info.clone() };
        let sealed = seal::seal(&self.body, passphrase, params, &info.header_bytes()?)
            .map_err(|e| ShareError::Usage(e.to_string()))?;
        Ok(Share { info, body: Zeroizing::new(sealed) })
    }

    /// Opens a sealed share with its holder's passphrase (`name` says which, in errors).
    pub fn unseal(&self, passphrase: &[u8], name: &str) -> Result<Share, ShareError> {
        if !self.info.sealed {
            return Ok(self.clone());
        }
        let body = seal::open(&self.body, passphrase, &self.info.header_bytes()?).map_err(|e| match e {
            SealError::WrongPassphrase => ShareError::WrongPassphrase(name.to_string()),
            other => ShareError::Damaged(format!("{name}: {other}")),
        })?;
        Ok(Share { info: ShareInfo { sealed: false, ..self.info.clone() }, body })
    }

    /// The KDF parameters of a sealed share.
    pub fn sealed_with(&self) -> Option<KdfParams> {
        self.info.sealed.then(|| seal::params_of(&self.body).ok()).flatten()
    }

    fn payload(&self) -> Result<Zeroizing<Vec<u8>>, ShareError> {
        let mut p = Zeroizing::new(self.info.header_bytes()?);
        p.extend_from_slice(&self.body);
        let sum = blake3::hash(&p);
        p.extend_from_slice(&sum.as_bytes()[..4]);
        Ok(p)
    }

    /// The printable text of this share.
    pub fn to_text(&self, holder: Option<&str>, written: &str) -> Result<Zeroizing<String>, ShareError> {
        let i = &self.info;
        let encoded = Zeroizing::new(encoding()?.encode(&self.payload()?));
        let mut t = Zeroizing::new(String::new());
        t.push_str(&format!("{TITLE}  ({SHARE_FORMAT})\n"));
        t.push_str(&format!("tenant     {}\n", i.tenant));
        t.push_str(&format!("key        {}\n", i.fingerprint));
        t.push_str(&format!("share      {} of {}; any {} rebuild the key\n", i.number, i.count, i.threshold));
        t.push_str(&format!("split      {}\n", i.split));
        if let Some(h) = holder {
            t.push_str(&format!("holder     {}\n", h.replace('\n', " ")));
        }
        match self.sealed_with() {
            Some(p) => t.push_str(&format!("sealed     yes, under the holder's passphrase ({})\n", p.describe())),
            None => t.push_str("sealed     no: anyone who reads this holds one share\n"),
        }
        t.push_str(&format!("written    {written}\n\n"));
        t.push_str("Type each line below exactly; the last two characters check the line.\n");
        t.push_str("I, L and O are read as 1, 1 and 0; case and spaces do not matter.\n\n");
        for (n, line) in encoded.as_bytes().chunks(LINE_CHARS).enumerate() {
            let line = std::str::from_utf8(line).map_err(|_| ShareError::Damaged("encoding".into()))?;
            let groups: Vec<&str> =
                line.as_bytes().chunks(GROUP).map(|g| std::str::from_utf8(g).unwrap_or_default()).collect();
            t.push_str(&format!("{:02}  {:<24} {}\n", n + 1, groups.join(" "), line_check(n + 1, line)));
        }
        Ok(t)
    }
}

fn encoding() -> Result<data_encoding::Encoding, ShareError> {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str(ALPHABET);
    spec.check_trailing_bits = false;
    spec.encoding().map_err(|e| ShareError::Damaged(format!("base32 alphabet: {e}")))
}

/// Two base32 characters from the line's number and its normalised characters.
fn line_check(number: usize, chars: &str) -> String {
    let mut h = blake3::Hasher::new_derive_key(CTX_LINE);
    h.update(&(number as u32).to_le_bytes());
    h.update(chars.as_bytes());
    let b = h.finalize();
    let v = u16::from_le_bytes([b.as_bytes()[0], b.as_bytes()[1]]);
    let a = ALPHABET.as_bytes();
    format!("{}{}", a[(v & 31) as usize] as char, a[((v >> 5) & 31) as usize] as char)
}

/// Upper case; O read as 0, I and L as 1; spaces and dashes dropped.
fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// Parses a share's text; an error names the line that is wrong.
pub fn parse_share(text: &str) -> Result<Share, ShareError> {
    let mut encoded = String::new();
    let mut header: Vec<(usize, String, String)> = Vec::new();
    let mut expect = 1usize;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.starts_with(TITLE) {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.len() == 2 && first.bytes().all(|b| b.is_ascii_digit()) {
            let tokens: Vec<&str> = words.collect();
            let Some((check, groups)) = tokens.split_last() else {
                return Err(ShareError::Line { line: line_no, reason: "a share line without its groups".into() });
            };
            let n: usize = first.parse().unwrap_or(0);
            if n != expect {
                return Err(ShareError::Line {
                    line: line_no,
                    reason: format!("share line {n:02} where {expect:02} was expected (a line is missing or repeated)"),
                });
            }
            let chars = normalise(&groups.concat());
            if let Some(bad) = chars.chars().find(|c| !ALPHABET.contains(*c)) {
                return Err(ShareError::Line {
                    line: line_no,
                    reason: format!("share line {n:02}: {bad:?} is not a share character"),
                });
            }
            if normalise(check) != line_check(n, &chars) {
                return Err(ShareError::Line {
                    line: line_no,
                    reason: format!(
                        "share line {n:02} does not match its check {check}: a group of this line is mistyped"
                    ),
                });
            }
            encoded.push_str(&chars);
            expect += 1;
        } else if let Some((key, value)) = line.split_once(char::is_whitespace) {
            header.push((line_no, key.to_string(), value.trim().to_string()));
        }
    }
    if encoded.is_empty() {
        return Err(ShareError::Damaged("not an Exclave key share: it has no share lines".into()));
    }
    let payload = Zeroizing::new(
        encoding()?
            .decode(encoded.as_bytes())
            .map_err(|_| ShareError::Damaged("the share lines do not decode (a line is missing?)".into()))?,
    );
    let share = decode_payload(&payload)?;
    // The header is for people, but it must not say something the payload does not.
    let i = &share.info;
    for (line, key, value) in header {
        let first = value.split_whitespace().next().unwrap_or_default();
        let wrong = match key.as_str() {
            "tenant" => value != i.tenant,
            "key" => first != i.fingerprint,
            "split" => first != i.split,
            "share" => !value.starts_with(&format!("{} of {};", i.number, i.count)),
            _ => false,
        };
        if wrong {
            return Err(ShareError::Line {
                line,
                reason: format!("{key} says {value:?}, the share lines say otherwise ({})", i.describe()),
            });
        }
    }
    Ok(share)
}

fn decode_payload(p: &[u8]) -> Result<Share, ShareError> {
    let damaged = |w: &str| ShareError::Damaged(format!("the share is damaged: {w}"));
    if p.len() < 25 + 4 {
        return Err(damaged("too short"));
    }
    let (body, sum) = p.split_at(p.len() - 4);
    if blake3::hash(body).as_bytes()[..4] != *sum {
        return Err(damaged("its checksum does not match (a line is missing or mistyped)"));
    }
    let sealed = match body[0] {
        KIND_PLAIN => false,
        KIND_SEALED => true,
        k => return Err(damaged(&format!("unknown kind {k}"))),
    };
    let t = body[24] as usize;
    if body.len() < 25 + t + 1 {
        return Err(damaged("too short for its tenant"));
    }
    let tenant = std::str::from_utf8(&body[25..25 + t]).map_err(|_| damaged("tenant is not text"))?.to_string();
    let (threshold, count, number) = (body[1], body[2], body[3]);
    if threshold < 2 || count < threshold || number == 0 {
        return Err(damaged("impossible share numbers"));
    }
    Ok(Share {
        info: ShareInfo {
            sealed,
            threshold,
            count,
            number,
            split: hex::encode(&body[4..8]),
            fingerprint: hex::encode(&body[8..16]),
            check: hex::encode(&body[16..24]),
            tenant,
        },
        body: Zeroizing::new(body[25 + t..].to_vec()),
    })
}

/// Rebuilds the key from shares (each with a name for errors: its file). Every share must be
/// unsealed, of one key and one split, counted once, and at least the threshold.
pub fn combine(shares: &[(String, Share)]) -> Result<TenantKeys, ShareError> {
    let Some((first_name, first)) = shares.first() else {
        return Err(ShareError::Usage("no share given".into()));
    };
    let mut by_number: std::collections::BTreeMap<u8, &str> = std::collections::BTreeMap::new();
    for (name, s) in shares {
        if s.info.sealed {
            return Err(ShareError::Sealed(name.clone()));
        }
        if (&s.info.tenant, &s.info.fingerprint) != (&first.info.tenant, &first.info.fingerprint) {
            return Err(ShareError::DifferentKeys {
                first: first_name.clone(),
                second: name.clone(),
                a: first.info.describe(),
                b: s.info.describe(),
            });
        }
        if s.info.split != first.info.split || s.info.check != first.info.check {
            return Err(ShareError::DifferentSplits {
                first: first_name.clone(),
                second: name.clone(),
                a: first.info.split.clone(),
                b: s.info.split.clone(),
            });
        }
        if s.body.len() != first.body.len() || s.info.threshold != first.info.threshold {
            return Err(ShareError::Damaged(format!("{name} does not fit with {first_name}")));
        }
        if let Some(prev) = by_number.insert(s.info.number, name) {
            return Err(ShareError::Duplicate { number: s.info.number, first: prev.to_string(), second: name.clone() });
        }
    }
    let need = first.info.threshold as usize;
    if by_number.len() < need {
        return Err(ShareError::NotEnough { tenant: first.info.tenant.clone(), given: by_number.len(), need });
    }
    let points: Vec<blahaj::Share> = shares
        .iter()
        .map(|(_, s)| {
            let mut b = Zeroizing::new(Vec::with_capacity(s.body.len() + 1));
            b.push(s.info.number);
            b.extend_from_slice(&s.body);
            blahaj::Share::try_from(&b[..]).map_err(|e| ShareError::Damaged(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let secret = Zeroizing::new(
        blahaj::Sharks(first.info.threshold).recover(&points).map_err(|e| ShareError::Damaged(e.to_string()))?,
    );
    let rebuilt = || ShareError::Rebuilt { want: first.info.fingerprint.clone() };
    let material = KeyMaterial::from_bytes(&secret).map_err(|_| rebuilt())?;
    if material.fingerprint() != first.info.fingerprint || material.check() != first.info.check {
        return Err(rebuilt());
    }
    Ok(TenantKeys::new(&first.info.tenant, material))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::seal::MIN_MEMORY_KIB;
    use proptest::prelude::*;

    const FAST: KdfParams = KdfParams { memory_kib: MIN_MEMORY_KIB, iterations: 1, parallelism: 1 };

    fn keys(rotations: usize) -> TenantKeys {
        let mut m = KeyMaterial::generate();
        for _ in 0..rotations {
            m.rotate().unwrap();
        }
        TenantKeys::new("lux", m)
    }

    fn named(shares: &[Share], pick: &[usize]) -> Vec<(String, Share)> {
        pick.iter().map(|i| (format!("share-{}.txt", i + 1), shares[*i].clone())).collect()
    }

    fn text(s: &Share) -> String {
        s.to_text(Some("Minister of Justice"), "2026-11-27").unwrap().to_string()
    }

    #[test]
    fn the_text_round_trips_and_tolerates_what_people_do() {
        let k = keys(1);
        let shares = split(&k, 3, 5).unwrap();
        let t = text(&shares[1]);
        assert!(t.contains("share      2 of 5; any 3 rebuild the key") && t.contains("holder     Minister of Justice"));
        assert!(!t.contains(&hex::encode(&shares[1].body[..])), "no raw bytes printed");
        let back = parse_share(&t).unwrap();
        assert_eq!(back.info, shares[1].info);
        // Typed back in lower case, with dashes, O for 0 and L for 1: the same share.
        let sloppy: String = t
            .lines()
            .map(|l| match l.split_once("  ") {
                Some((num, rest)) if num.len() == 2 && num.bytes().all(|b| b.is_ascii_digit()) => {
                    let mut r = rest.trim().to_lowercase().replace('0', "o").replace('1', "l");
                    if r.split_whitespace().count() >= 4 {
                        r = r.replacen(' ', "-", 2);
                    }
                    format!("{num} {r}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        assert_ne!(sloppy, t);
        let again = parse_share(&sloppy).unwrap();
        assert_eq!(again.info, shares[1].info);
        assert_eq!(&again.body[..], &shares[1].body[..]);
    }

    #[test]
    fn a_mistyped_group_is_named_by_its_line() {
        let shares = split(&keys(0), 2, 3).unwrap();
        let t = text(&shares[0]);
        let lines: Vec<&str> = t.lines().collect();
        let (i, line) = lines.iter().enumerate().find(|(_, l)| l.starts_with("03 ")).unwrap();
        let mut bad = line.to_string();
        let pos = 5; // the first character of the first group
        let c = if &bad[pos..pos + 1] == "A" { "B" } else { "A" };
        bad.replace_range(pos..pos + 1, c);
        let damaged = t.replace(line, &bad);
        match parse_share(&damaged) {
            Err(ShareError::Line { line, reason }) => {
                assert_eq!(line, i + 1);
                assert!(reason.contains("share line 03") && reason.contains("mistyped"), "{reason}");
            }
            other => panic!("expected a line error, got {other:?}"),
        }
        let missing = t.replace(&format!("{line}\n"), "");
        assert!(matches!(parse_share(&missing), Err(ShareError::Line { reason, .. }) if reason.contains("missing")));
        let header = t.replace("tenant     lux", "tenant     est");
        assert!(matches!(parse_share(&header), Err(ShareError::Line { reason, .. }) if reason.contains("tenant says")));
        assert!(parse_share("hello").is_err());
    }

    #[test]
    fn bad_sets_of_shares_say_what_is_wrong() {
        let k = keys(0);
        let shares = split(&k, 3, 5).unwrap();
        assert_eq!(
            combine(&named(&shares, &[0, 3])).unwrap_err().to_string(),
            "2 share(s) of lux's key given, 3 needed: 1 more"
        );
        let mut dup = named(&shares, &[0, 1]);
        dup.push(("copy.txt".into(), shares[1].clone()));
        assert!(matches!(combine(&dup), Err(ShareError::Duplicate { number: 2, .. })));
        let other = split(&TenantKeys::new("est", KeyMaterial::generate()), 3, 5).unwrap();
        let mut mixed = named(&shares, &[0, 1]);
        mixed.push(("est-3.txt".into(), other[2].clone()));
        let e = combine(&mixed).unwrap_err().to_string();
        assert!(e.contains("different keys") && e.contains("tenant est") && e.contains("est-3.txt"), "{e}");
        let again = split(&k, 3, 5).unwrap();
        let mut splits = named(&shares, &[0, 1]);
        splits.push(("again-3.txt".into(), again[2].clone()));
        assert!(matches!(combine(&splits), Err(ShareError::DifferentSplits { .. })));
        assert!(split(&k, 1, 5).is_err() && split(&k, 4, 3).is_err());
    }

    #[test]
    fn sealed_shares_need_their_holders_passphrase() {
        let k = keys(0);
        let shares = split(&k, 2, 3).unwrap();
        let sealed = shares[0].seal(b"holder one", &FAST).unwrap();
        let back = parse_share(&text(&sealed)).unwrap();
        assert!(back.info.sealed && back.sealed_with() == Some(FAST));
        let set = vec![("a".to_string(), back.clone()), ("b".to_string(), shares[1].clone())];
        assert!(matches!(combine(&set), Err(ShareError::Sealed(n)) if n == "a"));
        assert_eq!(back.unseal(b"holder two", "a").unwrap_err(), ShareError::WrongPassphrase("a".into()));
        let opened = back.unseal(b"holder one", "a").unwrap();
        let set = vec![("a".to_string(), opened), ("b".to_string(), shares[1].clone())];
        assert_eq!(combine(&set).unwrap().material().check(), k.material().check());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any k of n shares rebuild the key; any k-1 do not.
        #[test]
        fn any_k_rebuild_and_k_minus_1_do_not(
            k in 2u8..6, extra in 0u8..4, rotations in 0usize..3, seed in any::<u64>(),
        ) {
            use rand::{SeedableRng, seq::SliceRandom};
            let n = k + extra;
            let key = keys(rotations);
            let shares = split(&key, k, n).unwrap();
            let mut order: Vec<usize> = (0..n as usize).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            // Through their text, as a person would type them back.
            let typed: Vec<Share> = shares.iter().map(|s| parse_share(&text(s)).unwrap()).collect();
            let rebuilt = combine(&named(&typed, &order[..k as usize])).unwrap();
            prop_assert_eq!(rebuilt.material().check(), key.material().check());
            prop_assert_eq!(rebuilt.tenant, "lux");
            let short = combine(&named(&typed, &order[..k as usize - 1]));
            let is_not_enough = matches!(short, Err(ShareError::NotEnough { .. }));
            prop_assert!(is_not_enough);
        }

        /// Below the threshold, the arithmetic itself gives nothing of the key: k-1 shares
        /// interpolated as if they were enough give other material.
        #[test]
        fn k_minus_1_shares_interpolate_to_something_else(k in 3u8..6) {
            let key = keys(0);
            let shares = split(&key, k, k).unwrap();
            let points: Vec<blahaj::Share> = shares[..k as usize - 1]
                .iter()
                .map(|s| {
                    let mut b = vec![s.info.number];
                    b.extend_from_slice(&s.body);
                    blahaj::Share::try_from(&b[..]).unwrap()
                })
                .collect();
            let guess = blahaj::Sharks(k - 1).recover(&points).unwrap();
            prop_assert_ne!(&guess[..], &key.material().to_bytes()[..]);
        }
    }
}
