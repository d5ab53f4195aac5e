//! Writes a deterministic sample national register, the kind of data an agent backs up:
//! a population register as a SQL dump, vehicle and cadastre registers as CSV, and scanned
//! documents (incompressible scans and compressible XML decisions).
//!
//! Usage: exclave-sample-register OUT [SIZE_MIB] [SEED]

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};

const GIVEN: &[&str] = &["Aino", "Juhani", "Maria", "Eero", "Helena", "Mikael", "Liisa", "Onni", "Sofia", "Väinö"];
const SURNAMES: &[&str] = &["Virtanen", "Korhonen", "Mäkinen", "Nieminen", "Hämäläinen", "Laine", "Schmit", "Müller"];
const TOWNS: &[&str] = &["Helsinki", "Tampere", "Turku", "Oulu", "Luxembourg", "Esch-sur-Alzette", "Tallinn", "Tartu"];
const MAKES: &[&str] = &["Toyota Corolla", "Volkswagen Golf", "Skoda Octavia", "Volvo V60", "Ford Focus"];

const USAGE: &str = "usage: exclave-sample-register OUT [SIZE_MIB] [SEED]

Writes a deterministic sample national register into the directory OUT: persons.sql (a
population register dump), vehicles.csv, cadastre.csv and documents/ (scans and XML
decisions). SIZE_MIB defaults to 64, SEED to 20250101; the same seed gives the same bytes.";

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    let usage_error = |why: &str| -> ! {
        eprintln!("error: {why}\n{USAGE}");
        std::process::exit(2);
    };
    if let Some(flag) = args.iter().find(|a| a.starts_with('-')) {
        usage_error(&format!("unknown option {flag}"));
    }
    if args.is_empty() || args.len() > 3 {
        usage_error("expected OUT [SIZE_MIB] [SEED]");
    }
    let out = &args[0];
    let number = |i: usize, default: u64, what: &str| -> u64 {
        match args.get(i) {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| usage_error(&format!("{what} {s:?} is not a number"))),
        }
    };
    let mib = number(1, 64, "SIZE_MIB") as usize;
    let seed = number(2, 20250101, "SEED");
    let total = mib << 20;
    let out = Path::new(out);
    std::fs::create_dir_all(out.join("documents/2025/01"))?;
    let mut rng = StdRng::seed_from_u64(seed);
    persons(&out.join("persons.sql"), total * 60 / 100, &mut rng)?;
    vehicles(&out.join("vehicles.csv"), total * 9 / 100, &mut rng)?;
    cadastre(&out.join("cadastre.csv"), total * 6 / 100, &mut rng)?;
    documents(&out.join("documents"), total * 25 / 100, &mut rng)?;
    println!("sample register of {mib} MiB written to {}", out.display());
    Ok(())
}

fn pick<'a>(rng: &mut StdRng, v: &[&'a str]) -> &'a str {
    v[rng.random_range(0..v.len())]
}

fn persons(p: &Path, bytes: usize, rng: &mut StdRng) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let mut n = 0usize;
    let header = "-- population register dump\nCOPY public.persons (id, personal_code, given_name, surname, birth_date, municipality, address, civil_status) FROM stdin;\n";
    f.write_all(header.as_bytes())?;
    n += header.len();
    let mut id = 1u64;
    while n < bytes {
        let line = format!(
            "{id}\t{:06}-{:04}\t{}\t{}\t{}-{:02}-{:02}\t{}\t{} {}\t{}\n",
            rng.random_range(0..999_999u32),
            rng.random_range(0..9_999u32),
            pick(rng, GIVEN),
            pick(rng, SURNAMES),
            rng.random_range(1920..2025u32),
            rng.random_range(1..13u32),
            rng.random_range(1..29u32),
            pick(rng, TOWNS),
            pick(rng, &["Mannerheimintie", "Rue de la Gare", "Pikk", "Kauppakatu"]),
            rng.random_range(1..200u32),
            pick(rng, &["single", "married", "divorced", "widowed"]),
        );
        f.write_all(line.as_bytes())?;
        n += line.len();
        id += 1;
    }
    f.write_all(b"\\.\n")?;
    f.flush()
}

fn vehicles(p: &Path, bytes: usize, rng: &mut StdRng) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let mut n = 0;
    f.write_all(b"vin,plate,make_model,first_registration,owner_id,co2_g_km\n")?;
    while n < bytes {
        let line = format!(
            "WVW{:014},{}{}{}-{:03},{},{}-{:02}-{:02},{},{}\n",
            rng.random_range(0..99_999_999_999_999u64),
            (b'A' + rng.random_range(0..26u8)) as char,
            (b'A' + rng.random_range(0..26u8)) as char,
            (b'A' + rng.random_range(0..26u8)) as char,
            rng.random_range(0..999u32),
            pick(rng, MAKES),
            rng.random_range(1990..2025u32),
            rng.random_range(1..13u32),
            rng.random_range(1..29u32),
            rng.random_range(1..5_000_000u32),
            rng.random_range(0..300u32),
        );
        f.write_all(line.as_bytes())?;
        n += line.len();
    }
    f.flush()
}

fn cadastre(p: &Path, bytes: usize, rng: &mut StdRng) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
    let mut n = 0;
    f.write_all(b"parcel_id,municipality,area_m2,land_use,owner_id,valuation_eur\n")?;
    while n < bytes {
        let line = format!(
            "{}-{:03}-{:04}-{:04},{},{},{},{},{}\n",
            rng.random_range(1..999u32),
            rng.random_range(1..999u32),
            rng.random_range(1..9999u32),
            rng.random_range(1..9999u32),
            pick(rng, TOWNS),
            rng.random_range(100..100_000u32),
            pick(rng, &["residential", "agricultural", "forest", "commercial"]),
            rng.random_range(1..5_000_000u32),
            rng.random_range(10_000..2_000_000u32),
        );
        f.write_all(line.as_bytes())?;
        n += line.len();
    }
    f.flush()
}

fn documents(dir: &Path, bytes: usize, rng: &mut StdRng) -> std::io::Result<()> {
    let mut n = 0;
    let mut i = 0;
    while n < bytes {
        let sub = dir.join(format!("2025/{:02}", 1 + i % 3));
        std::fs::create_dir_all(&sub)?;
        if i % 2 == 0 {
            // A scan: random bytes behind a PDF header, incompressible like real scans.
            let len = rng.random_range(64 * 1024..512 * 1024);
            let mut body = b"%PDF-1.7\n%scan\n".to_vec();
            let start = body.len();
            body.resize(start + len, 0);
            rng.fill(&mut body[start..]);
            std::fs::write(sub.join(format!("scan-{i:05}.pdf")), &body)?;
            n += body.len();
        } else {
            let mut xml = format!("<?xml version=\"1.0\"?>\n<decision id=\"{i}\">\n");
            for k in 0..rng.random_range(50..400) {
                xml.push_str(&format!(
                    "  <paragraph n=\"{k}\">The applicant {} {} of {} is granted the permit.</paragraph>\n",
                    pick(rng, GIVEN),
                    pick(rng, SURNAMES),
                    pick(rng, TOWNS)
                ));
            }
            xml.push_str("</decision>\n");
            std::fs::write(sub.join(format!("decision-{i:05}.xml")), xml.as_bytes())?;
            n += xml.len();
        }
        i += 1;
    }
    Ok(())
}
