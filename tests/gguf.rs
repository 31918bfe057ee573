//! GGUF reader/writer, reference quantizers and tiny-model generator tests.
//!
//! Covers: writer -> reader round trips of every metadata type and dtype, typed errors for
//! corrupted files, a seeded mutation loop that must never panic, quantizer accuracy and
//! hand-computed blocks, the tiny Llama generator, and (when present) the real
//! SmolLM2-135M-Instruct Q4_1 file.

use std::path::PathBuf;

use brigade::gguf::{GgufError, GgufFile, GgufWriter, MetaValue};
use brigade::quant::reference::{self, QuantizeError};
use brigade::quant::GgmlDType;
use brigade::testing::{
    tiny_llama_gguf, tiny_vocab, write_tiny_llama, TinyLlamaSpec, CHATML_TEMPLATE,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- helpers

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("pattern {needle:?} not found"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn rand_vec(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A small valid file: two keys and two tensors.
fn base_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_str("general.architecture", "llama")
        .add_u32("answer", 42);
    w.add_tensor_f32("a", &[32, 2], GgmlDType::Q8_0, &[0.5; 64])
        .unwrap();
    w.add_tensor_f32("b", &[4], GgmlDType::F32, &[1.0, 2.0, 3.0, 4.0])
        .unwrap();
    w
}

fn real_model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BRIGADE_MODEL") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let home = std::env::var("HOME").ok()?;
    let p = PathBuf::from(home).join(".cache/brigade/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

// ---------------------------------------------------------------- round trips

#[test]
fn roundtrip_all_metadata_types() {
    let entries: Vec<(&str, MetaValue)> = vec![
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-100)),
        ("u16", MetaValue::U16(60_000)),
        ("i16", MetaValue::I16(-30_000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("f32", MetaValue::F32(1.5e-5)),
        ("bool", MetaValue::Bool(true)),
        ("str", MetaValue::Str("héllo wörld".into())),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f64", MetaValue::F64(std::f64::consts::PI)),
        ("empty_str", MetaValue::Str(String::new())),
        (
            "arr_u32",
            MetaValue::Array(vec![
                MetaValue::U32(1),
                MetaValue::U32(2),
                MetaValue::U32(3),
            ]),
        ),
        (
            "arr_str",
            MetaValue::Array(vec![
                MetaValue::Str("a b".into()),
                MetaValue::Str("Ġt he".into()),
            ]),
        ),
        ("arr_empty", MetaValue::Array(vec![])),
        (
            "arr_nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I16(-1), MetaValue::I16(2)]),
                MetaValue::Array(vec![MetaValue::I16(3)]),
                MetaValue::Array(vec![]),
            ]),
        ),
        (
            "arr_nested_str",
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::Array(vec![
                MetaValue::Str("deep".into()),
            ])])]),
        ),
        (
            "arr_f64",
            MetaValue::Array(vec![MetaValue::F64(0.25), MetaValue::F64(-1e300)]),
        ),
        (
            "arr_bool",
            MetaValue::Array(vec![MetaValue::Bool(false), MetaValue::Bool(true)]),
        ),
        ("small_i64", MetaValue::I64(7)),
        ("neg_i32", MetaValue::I32(-1)),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &entries {
        w.add(*k, v.clone());
    }
    let f = parse(w.to_bytes()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata().len(), entries.len());
    for ((k, v), (rk, rv)) in entries.iter().zip(f.metadata()) {
        assert_eq!(k, rk);
        assert_eq!(v, rv, "value of {k}");
    }

    // Accessors: integer widening/narrowing, floats, typed errors naming the key.
    assert_eq!(f.get_u32("u8").unwrap(), 200);
    assert_eq!(f.get_u32("small_i64").unwrap(), 7);
    assert_eq!(f.get_u64("u64").unwrap(), u64::MAX);
    assert_eq!(f.get_i64("i64").unwrap(), i64::MIN);
    assert!(matches!(f.get_u32("u64"), Err(GgufError::OutOfRange { key, .. }) if key == "u64"));
    assert!(matches!(
        f.get_u32("neg_i32"),
        Err(GgufError::OutOfRange { .. })
    ));
    assert!(
        matches!(f.get_u32("str"), Err(GgufError::WrongType { key, found: "string", .. }) if key == "str")
    );
    assert_eq!(f.get_f32("f32").unwrap(), 1.5e-5);
    assert_eq!(f.get_f32("f64").unwrap(), std::f64::consts::PI as f32);
    assert!(matches!(f.get_f32("u32"), Err(GgufError::WrongType { .. })));
    assert!(f.get_bool("bool").unwrap());
    assert_eq!(f.get_str("str").unwrap(), "héllo wörld");
    assert_eq!(f.get_str_array("arr_str").unwrap(), vec!["a b", "Ġt he"]);
    assert!(f.get_str_array("arr_empty").unwrap().is_empty());
    assert_eq!(f.get_i32_array("arr_u32").unwrap(), vec![1, 2, 3]);
    assert!(matches!(
        f.get_str_array("arr_u32"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        f.get_i32_array("str"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(f.get_u32("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    assert!(f.get("nope").is_none());
    assert_eq!(
        f.get_f32_array("arr_f64").unwrap(),
        vec![0.25, f32::NEG_INFINITY]
    );

    // i32 array accessor rejects u32 values that do not fit.
    let mut w = GgufWriter::new();
    w.add("big", MetaValue::Array(vec![MetaValue::U32(u32::MAX)]));
    let f = parse(w.to_bytes()).unwrap();
    assert!(matches!(
        f.get_i32_array("big"),
        Err(GgufError::OutOfRange { .. })
    ));
}

#[test]
fn roundtrip_all_dtypes_and_alignments() {
    let mut rng = SmallRng::seed_from_u64(7);
    for alignment in [32u32, 64, 1, 256] {
        let mut w = GgufWriter::new();
        if alignment != 32 {
            w.set_alignment(alignment);
        }
        let mut expected = Vec::new();
        // Every dtype's raw bytes round-trip in tests/quant.rs; here the ones with a quantizer.
        for (i, dtype) in reference::QUANTIZABLE.iter().copied().enumerate() {
            let dims: Vec<u64> = match i % 3 {
                0 => vec![64, 3],
                1 => vec![32],
                _ => vec![32, 2, 3, 2],
            };
            let n: u64 = dims.iter().product();
            let values = rand_vec(&mut rng, n as usize, 2.0);
            let data = reference::quantize(dtype, &values).unwrap();
            let name = format!("t.{}", dtype.name());
            w.add_tensor(name.clone(), &dims, dtype, data.clone());
            expected.push((name, dims, dtype, data));
        }
        let f = parse(w.to_bytes()).unwrap();
        assert_eq!(f.alignment(), u64::from(alignment));
        assert_eq!(f.data_start() % u64::from(alignment), 0);
        assert_eq!(f.tensors().len(), expected.len());
        for (name, dims, dtype, data) in &expected {
            let info = f.tensor_info(name).unwrap();
            assert_eq!(&info.dims, dims);
            assert_eq!(info.dtype, *dtype);
            assert_eq!(info.offset % u64::from(alignment), 0);
            assert_eq!(info.size_bytes, data.len() as u64);
            assert_eq!(info.n_elements(), dims.iter().product::<u64>());
            assert_eq!(info.row_len(), dims[0]);
            assert_eq!(info.n_rows(), dims[1..].iter().product::<u64>());
            assert_eq!(info.row_size_bytes() * info.n_rows(), info.size_bytes);
            assert_eq!(f.tensor_data(name).unwrap(), &data[..]);
            assert!(f.tensor_with_dims(name, dims).is_ok());
        }
        assert!(
            matches!(f.tensor_data("missing"), Err(GgufError::MissingTensor(n)) if n == "missing")
        );
        assert!(matches!(
            f.tensor_with_dims("t.F32", &[1, 2]),
            Err(GgufError::UnexpectedDims { .. })
        ));
    }
}

#[test]
fn version_2_is_accepted_and_open_maps_files() {
    let mut w = base_writer();
    w.set_version(2);
    assert_eq!(parse(w.to_bytes()).unwrap().version(), 2);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    base_writer().write_to(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.tensor_data("b").unwrap(),
        &reference::quantize(GgmlDType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap()[..]
    );
    assert_eq!(f.get_u32("answer").unwrap(), 42);
    assert!(matches!(
        GgufFile::open(dir.path().join("nope.gguf")),
        Err(GgufError::Io { .. })
    ));
    std::fs::write(dir.path().join("empty.gguf"), b"").unwrap();
    assert!(matches!(
        GgufFile::open(dir.path().join("empty.gguf")),
        Err(GgufError::Truncated { .. })
    ));
}

// ---------------------------------------------------------------- corruption

#[test]
fn corrupt_header() {
    let good = base_writer().to_bytes();
    assert!(parse(good.clone()).is_ok());

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(parse(b), Err(GgufError::BadMagic { found }) if &found == b"XGUF"));

    for v in [0u32, 1, 4, 99, u32::MAX] {
        let mut w = base_writer();
        w.set_version(v);
        assert!(matches!(parse(w.to_bytes()), Err(GgufError::UnsupportedVersion(got)) if got == v));
    }

    for cut in [0usize, 3, 4, 7, 10, 23] {
        assert!(
            matches!(
                parse(good[..cut].to_vec()),
                Err(GgufError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }

    // Huge tensor_count / kv_count: preallocation is capped, parsing runs out of input.
    let mut b = good.clone();
    put_u64(&mut b, 8, u64::MAX);
    assert!(parse(b).is_err());
    let mut b = good.clone();
    put_u64(&mut b, 16, 1 << 60);
    assert!(parse(b).is_err());
    let mut w = GgufWriter::new();
    w.add_u32("k", 1);
    let mut b = w.to_bytes();
    b.truncate(24 + 8 + 1 + 4 + 4); // drop the zero padding after the only entry
    put_u64(&mut b, 16, u64::MAX);
    assert!(matches!(parse(b), Err(GgufError::Truncated { what, .. }) if what.contains("#1")));
}

#[test]
fn corrupt_metadata() {
    let mut w = GgufWriter::new();
    w.add_u32("first", 1)
        .add(
            "arr",
            MetaValue::Array(vec![MetaValue::U32(7), MetaValue::U32(8)]),
        )
        .add_str("name", "abc");
    let good = w.to_bytes();
    assert!(parse(good.clone()).is_ok());

    // Truncated inside the value of `first` (header 24 + len 8 + "first" 5 + type 4 + 2).
    let cut = 24 + 8 + 5 + 4 + 2;
    assert!(matches!(
        parse(good[..cut].to_vec()),
        Err(GgufError::Truncated { what, offset }) if what == "first" && offset == (cut - 2) as u64
    ));
    // Truncated inside a key.
    assert!(matches!(
        parse(good[..24 + 8 + 2].to_vec()),
        Err(GgufError::LengthOutOfBounds { .. })
    ));

    // Huge string length (of the first key).
    let mut b = good.clone();
    put_u64(&mut b, 24, u64::MAX - 3);
    assert!(
        matches!(parse(b), Err(GgufError::LengthOutOfBounds { len, .. }) if len == u64::MAX - 3)
    );

    // Huge array count.
    let arr_at = find(&good, b"arr") + 3; // -> value type (u32), elem type (u32), count (u64)
    let mut b = good.clone();
    put_u64(&mut b, arr_at + 8, 1 << 62);
    assert!(
        matches!(parse(b), Err(GgufError::LengthOutOfBounds { what, .. }) if what.contains("arr"))
    );
    let mut b = good.clone();
    put_u64(&mut b, arr_at + 8, u64::MAX);
    assert!(matches!(parse(b), Err(GgufError::LengthOutOfBounds { .. })));

    // Unknown metadata value type, and unknown array element type.
    let mut b = good.clone();
    put_u32(&mut b, 24 + 8 + 5, 13);
    assert!(matches!(parse(b), Err(GgufError::UnknownMetaType { key, raw: 13 }) if key == "first"));
    let mut b = good.clone();
    put_u32(&mut b, arr_at + 4, 0xdead);
    assert!(
        matches!(parse(b), Err(GgufError::UnknownMetaType { key, raw: 0xdead }) if key == "arr")
    );

    // Non-UTF-8 string value, and non-UTF-8 key.
    let mut b = good.clone();
    let at = find(&good, b"abc");
    b[at] = 0xff;
    assert!(matches!(parse(b), Err(GgufError::InvalidUtf8 { what }) if what == "name"));
    let mut b = good.clone();
    b[24 + 8] = 0xc3; // lone UTF-8 lead byte in "first"
    assert!(matches!(parse(b), Err(GgufError::InvalidUtf8 { what }) if what.contains("#0")));

    // Duplicate key.
    let mut w = GgufWriter::new();
    w.add_u32("k", 1).add_u32("k", 2);
    assert!(matches!(parse(w.to_bytes()), Err(GgufError::DuplicateKey(k)) if k == "k"));

    // Arrays nested too deep.
    let mut v = MetaValue::U8(1);
    for _ in 0..20 {
        v = MetaValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add("deep", v);
    assert!(
        matches!(parse(w.to_bytes()), Err(GgufError::NestingTooDeep { key, .. }) if key == "deep")
    );
}

#[test]
fn corrupt_alignment() {
    for bad in [0u32, 3, 48, u32::MAX] {
        let mut w = base_writer();
        w.set_alignment(bad);
        assert!(
            matches!(parse(w.to_bytes()), Err(GgufError::BadAlignment(a)) if a == u64::from(bad)),
            "alignment {bad}"
        );
    }
    let mut w = base_writer();
    w.add_str("general.alignment", "32");
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::WrongType { key, expected: "u32", .. }) if key == "general.alignment"
    ));
}

#[test]
fn corrupt_tensor_infos() {
    // Unknown and unsupported ggml types.
    let mut w = base_writer();
    w.add_tensor_raw("weird", &[32], 99, vec![0; 64]);
    assert!(
        matches!(parse(w.to_bytes()), Err(GgufError::UnknownDType { tensor, raw: 99 }) if tensor == "weird")
    );
    let mut w = base_writer();
    w.add_tensor_raw("k", &[256], 16, vec![0; 66]);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::UnsupportedDType { tensor, name: "IQ2_XXS", raw: 16 }) if tensor == "k"
    ));

    // n_dims > 4 and n_dims == 0.
    let mut w = base_writer();
    w.add_tensor("five", &[1, 1, 1, 1, 1], GgmlDType::F32, vec![0; 4]);
    assert!(
        matches!(parse(w.to_bytes()), Err(GgufError::BadDims { tensor, n_dims: 5, .. }) if tensor == "five")
    );
    let mut w = base_writer();
    w.add_tensor("zero", &[], GgmlDType::F32, vec![0; 4]);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::BadDims { n_dims: 0, .. })
    ));

    // Tensor data past the end of the file (cut the padded tail) and offset past the end.
    let good = base_writer().to_bytes();
    let b = good[..good.len() - 32].to_vec();
    assert!(matches!(parse(b), Err(GgufError::TensorOutOfBounds { tensor, .. }) if tensor == "b"));
    let mut w = base_writer();
    w.override_offset("a", 1 << 40);
    assert!(
        matches!(parse(w.to_bytes()), Err(GgufError::TensorOutOfBounds { tensor, .. }) if tensor == "a")
    );
    let mut w = base_writer();
    w.override_offset("a", u64::MAX - 31);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::TensorOutOfBounds { .. })
    ));

    // Misaligned offset.
    let mut w = base_writer();
    w.override_offset("b", 16);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::MisalignedTensor { tensor, offset: 16, alignment: 32 }) if tensor == "b"
    ));

    // Row length not a multiple of the block size.
    let mut w = base_writer();
    w.add_tensor("rows", &[48, 2], GgmlDType::Q4_0, vec![0; 3 * 18]);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::ShapeMismatch { tensor, row_len: 48, block_size: 32, .. }) if tensor == "rows"
    ));

    // Element count overflow.
    let mut w = base_writer();
    w.add_tensor("huge", &[1 << 40, 1 << 40], GgmlDType::F32, vec![]);
    assert!(
        matches!(parse(w.to_bytes()), Err(GgufError::TensorTooLarge { tensor, .. }) if tensor == "huge")
    );
    let mut w = base_writer();
    w.add_tensor("huge2", &[u64::MAX], GgmlDType::F32, vec![]);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::TensorTooLarge { .. })
    ));

    // Duplicate tensor name.
    let mut w = base_writer();
    w.add_tensor("a", &[4], GgmlDType::F32, vec![0; 16]);
    assert!(matches!(parse(w.to_bytes()), Err(GgufError::DuplicateTensor(n)) if n == "a"));

    // Non-UTF-8 tensor name.
    let mut good = base_writer();
    good.add_tensor("zzzz", &[4], GgmlDType::F32, vec![0; 16]);
    let good = good.to_bytes();
    let mut b = good.clone();
    let at = find(&good, b"zzzz");
    b[at + 1] = 0x80;
    assert!(
        matches!(parse(b), Err(GgufError::InvalidUtf8 { what }) if what.contains("tensor info #2"))
    );
}

#[test]
fn overlapping_tensors_are_rejected() {
    // `a` (Q8_0, 68 bytes) lies at 0..68 and `b` (F32, 16 bytes) at 96..112; before the
    // check, pointing `b` into `a` loaded and read `a`'s bytes as `b`'s values.
    let mut w = base_writer();
    assert!(w.override_offset("b", 64));
    let err = parse(w.to_bytes()).unwrap_err();
    assert!(
        matches!(
            &err,
            GgufError::OverlappingTensors { first, first_start: 0, first_end: 68, second, second_start: 64, second_end: 80 }
                if first == "a" && second == "b"
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("`a`") && msg.contains("`b`") && msg.contains("overlap"),
        "{msg}"
    );

    // Two tensors at the same offset (aliasing), whatever their order in the file.
    let mut w = base_writer();
    w.override_offset("b", 0);
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::OverlappingTensors {
            first_start: 0,
            second_start: 0,
            ..
        })
    ));

    // A tensor starting where another ends is fine (ranges are half-open).
    let mut w = base_writer();
    w.add_tensor("c", &[8], GgmlDType::F32, vec![0; 32]);
    w.add_tensor("d", &[8], GgmlDType::F32, vec![0; 32]);
    let f = parse(w.to_bytes()).unwrap();
    let (c, d) = (f.tensor_info("c").unwrap(), f.tensor_info("d").unwrap());
    assert_eq!(c.offset + c.size_bytes, d.offset);
}

#[test]
fn random_mutations_never_panic() {
    let spec = TinyLlamaSpec {
        n_layers: 1,
        ..TinyLlamaSpec::default()
    };
    let good = tiny_llama_gguf(&spec);
    let header_len = parse(good.clone()).unwrap().data_start() as usize;
    let mut n_ok = 0usize;
    let mut n_err = 0usize;
    const ITERS: u64 = 3000;
    for iter in 0..ITERS {
        let seed = 0x5eed_0000 + iter;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut b = good.clone();
        let n_mut = rng.gen_range(1..=8);
        for _ in 0..n_mut {
            // Mostly hit the header/metadata/tensor infos, where parsing happens.
            let hi = if rng.gen_bool(0.9) {
                header_len
            } else {
                b.len()
            };
            if hi == 0 {
                continue;
            }
            let at = rng.gen_range(0..hi);
            b[at] = match rng.gen_range(0..4) {
                0 => rng.gen(),
                1 => b[at] ^ (1 << rng.gen_range(0..8)),
                2 => 0xff,
                _ => 0,
            };
        }
        if rng.gen_bool(0.25) {
            let cut = rng.gen_range(0..=b.len());
            b.truncate(cut);
        }
        let result = std::panic::catch_unwind(move || {
            let f = GgufFile::from_bytes(b)?;
            // Exercise the accessors on whatever parsed.
            for (k, _) in f.metadata() {
                let _ = f.get_u32(k);
                let _ = f.get_f32(k);
                let _ = f.get_str(k);
                let _ = f.get_str_array(k);
                let _ = f.get_i32_array(k);
            }
            for t in f.tensors() {
                let data = f.tensor_data(&t.name)?;
                assert_eq!(data.len() as u64, t.size_bytes);
                let _ = reference::dequantize(t.dtype, data, t.n_elements() as usize);
            }
            Ok::<(), GgufError>(())
        });
        match result {
            Ok(Ok(())) => n_ok += 1,
            Ok(Err(_)) => n_err += 1,
            Err(_) => {
                panic!("GGUF parsing panicked for mutation seed {seed:#x} (iteration {iter})")
            }
        }
    }
    assert_eq!(n_ok + n_err, ITERS as usize);
    assert!(
        n_err > 100,
        "mutations should usually be detected: ok={n_ok} err={n_err}"
    );
}

// ---------------------------------------------------------------- quantizers

/// Tiny scales are f16 subnormals (absolute error up to 2^-25), times up to 128 levels.
const F16_SUBNORMAL_SLACK: f32 = 128.0 / 33_554_432.0;

#[test]
fn quantize_error_bounds() {
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..200 {
        let scale = 10f32.powf(rng.gen_range(-3.0..2.0));
        let x = rand_vec(&mut rng, 256, scale);
        for dtype in reference::QUANTIZABLE {
            let bytes = reference::quantize(dtype, &x).unwrap();
            assert_eq!(bytes.len(), 256 / dtype.block_size() * dtype.type_size());
            let y = reference::dequantize(dtype, &bytes, x.len()).unwrap();
            for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
                let amax = blk_x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let min = blk_x.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = blk_x.iter().fold(f32::MIN, |m, &v| m.max(v));
                for (&a, &b) in blk_x.iter().zip(blk_y) {
                    let err = (a - b).abs();
                    let bound = match dtype {
                        GgmlDType::F32 => 0.0,
                        GgmlDType::F16 => a.abs() * 1.0 / 2048.0 + 1e-7,
                        GgmlDType::BF16 => a.abs() / 256.0,
                        // Rounding to the nearest of 127 steps, plus f16 rounding of d.
                        GgmlDType::Q8_0 => amax / 127.0 * 0.57 + F16_SUBNORMAL_SLACK,
                        // The value opposite to `max` can be clamped a full step.
                        GgmlDType::Q4_0 => amax / 8.0 * 1.01 + F16_SUBNORMAL_SLACK,
                        GgmlDType::Q5_0 => amax / 16.0 * 1.01 + F16_SUBNORMAL_SLACK,
                        GgmlDType::Q5_1 => {
                            (max - min) / 31.0 * 0.52 + amax / 512.0 + F16_SUBNORMAL_SLACK
                        }
                        GgmlDType::Q4_1 => {
                            (max - min) / 15.0 * 0.52 + amax / 512.0 + F16_SUBNORMAL_SLACK
                        }
                        other => panic!("no error bound for {other:?}"),
                    };
                    assert!(
                        err <= bound,
                        "{} x={a} y={b} err={err} bound={bound}",
                        dtype.name()
                    );
                }
            }
        }
    }
}

#[test]
fn quantize_hand_computed_blocks() {
    // Q8_0: x[j] = j - 16. amax = 16, d = 16/127 -> f16 0x3008 (0.1259765625),
    // id = 127/16 = 7.9375, q[j] = round((j - 16) * 7.9375).
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let b = reference::quantize(GgmlDType::Q8_0, &x).unwrap();
    assert_eq!(&b[..2], &0x3008u16.to_le_bytes());
    assert_eq!(b[2] as i8, -127); // j = 0: -127
    assert_eq!(b[2 + 1] as i8, -119); // -15 * 7.9375 = -119.06
    assert_eq!(b[2 + 14] as i8, -16); // -2 * 7.9375 = -15.875
    assert_eq!(b[2 + 16] as i8, 0);
    assert_eq!(b[2 + 31] as i8, 119); // 15 * 7.9375 = 119.06
    let y = reference::dequantize(GgmlDType::Q8_0, &b, 32).unwrap();
    assert_eq!(y[0], -127.0 * (129.0 / 1024.0));

    // Q4_0: same x. The first largest |x| is x[0] = -16, so d = -16 / -8 = 2 (f16 0x4000),
    // id = 0.5, q = trunc(x * 0.5 + 8.5) clamped to 15.
    let b = reference::quantize(GgmlDType::Q4_0, &x).unwrap();
    assert_eq!(&b[..2], &0x4000u16.to_le_bytes());
    assert_eq!(b[2], 0x80); // j=0: x=-16 -> 0; x[16]=0 -> 8
    assert_eq!(b[2 + 1], 0x91); // x=-15 -> 1;  x[17]=1 -> 9
    assert_eq!(b[2 + 3], 0xA2); // x=-13 -> 2;  x[19]=3 -> 10
    assert_eq!(b[2 + 15], 0xF8); // x=-1 -> 8; x[31]=15 -> 16, clamped to 15
    let y = reference::dequantize(GgmlDType::Q4_0, &b, 32).unwrap();
    assert_eq!(y[0], -16.0);
    assert_eq!(y[31], 14.0);

    // Q4_1: x[j] = (j % 16) + 1. min = 1, max = 16, d = 1, q[j] = j % 16.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 + 1.0).collect();
    let b = reference::quantize(GgmlDType::Q4_1, &x).unwrap();
    assert_eq!(&b[..4], &[0x00, 0x3C, 0x00, 0x3C]);
    let expected: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
    assert_eq!(&b[4..], &expected[..]);
    assert_eq!(reference::dequantize(GgmlDType::Q4_1, &b, 32).unwrap(), x);

    // All-zero blocks give d = 0 and decode to zeros.
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let b = reference::quantize(dtype, &[0.0; 32]).unwrap();
        assert_eq!(reference::dequantize(dtype, &b, 32).unwrap(), vec![0.0; 32]);
    }

    // BF16 / F16 exact values.
    let b = reference::quantize(GgmlDType::BF16, &[1.0, -2.0]).unwrap();
    assert_eq!(b, vec![0x80, 0x3F, 0x00, 0xC0]);
    let b = reference::quantize(GgmlDType::F16, &[1.0, -2.0]).unwrap();
    assert_eq!(b, vec![0x00, 0x3C, 0x00, 0xC0]);

    // Errors.
    assert!(matches!(
        reference::quantize(GgmlDType::Q8_0, &[0.0; 33]),
        Err(QuantizeError::NotBlockMultiple { n_elements: 33, .. })
    ));
    assert!(matches!(
        reference::dequantize(GgmlDType::Q8_0, &[0; 33], 32),
        Err(QuantizeError::ByteLenMismatch {
            expected: 34,
            got: 33,
            ..
        })
    ));
}

// ---------------------------------------------------------------- tiny model

#[test]
fn tiny_llama_parses_back() {
    for (weight_dtype, untied) in [
        (GgmlDType::Q8_0, false),
        (GgmlDType::Q4_0, true),
        (GgmlDType::Q4_1, false),
        (GgmlDType::F16, false),
        (GgmlDType::BF16, true),
        (GgmlDType::F32, false),
    ] {
        let spec = TinyLlamaSpec {
            weight_dtype,
            untied,
            ..TinyLlamaSpec::default()
        };
        let f = parse(tiny_llama_gguf(&spec)).unwrap();
        let vocab = tiny_vocab();
        let n_vocab = vocab.tokens.len() as u64;
        let (dim, kv, ffn) = (64u64, 32u64, 128u64);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 64);
        assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 128);
        assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 4);
        assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 2);
        assert_eq!(f.get_u32("llama.rope.dimension_count").unwrap(), 16);
        assert_eq!(f.get_u32("llama.context_length").unwrap(), 256);
        assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 10_000.0);
        assert_eq!(
            f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            1e-5
        );
        assert_eq!(u64::from(f.get_u32("llama.vocab_size").unwrap()), n_vocab);
        assert_eq!(u64::from(spec.vocab_size()), n_vocab);

        f.tensor_with_dims("token_embd.weight", &[dim, n_vocab])
            .unwrap();
        assert_eq!(
            f.tensor_info("token_embd.weight").unwrap().dtype,
            GgmlDType::Q8_0
        );
        f.tensor_with_dims("output_norm.weight", &[dim]).unwrap();
        assert_eq!(f.has_tensor("output.weight"), untied);
        for i in 0..2 {
            for (name, dims) in [
                ("attn_norm", vec![dim]),
                ("attn_q", vec![dim, dim]),
                ("attn_k", vec![dim, kv]),
                ("attn_v", vec![dim, kv]),
                ("attn_output", vec![dim, dim]),
                ("ffn_norm", vec![dim]),
                ("ffn_gate", vec![dim, ffn]),
                ("ffn_up", vec![dim, ffn]),
                ("ffn_down", vec![ffn, dim]),
            ] {
                let info = f
                    .tensor_with_dims(&format!("blk.{i}.{name}.weight"), &dims)
                    .unwrap();
                let want = if dims.len() == 1 {
                    GgmlDType::F32
                } else {
                    weight_dtype
                };
                assert_eq!(info.dtype, want, "{name}");
                let values = reference::dequantize(
                    info.dtype,
                    f.info_data(info).unwrap(),
                    info.n_elements() as usize,
                )
                .unwrap();
                assert!(
                    values.iter().all(|v| v.is_finite() && v.abs() <= 1.2),
                    "{name}"
                );
                if dims.len() == 1 {
                    assert!(
                        values.iter().all(|v| (0.85..=1.15).contains(v)),
                        "{name} ~ 1.0"
                    );
                }
            }
        }
        let expected_tensors = 1 + 2 * 9 + 1 + usize::from(untied);
        assert_eq!(f.tensors().len(), expected_tensors);

        // Tokenizer metadata.
        assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
        let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        let types = f.get_i32_array("tokenizer.ggml.token_type").unwrap();
        let merges = f.get_str_array("tokenizer.ggml.merges").unwrap();
        assert_eq!(tokens.len() as u64, n_vocab);
        assert_eq!(types.len(), tokens.len());
        assert!(merges.len() >= 24);
        assert_eq!(tokens[0], "!");
        assert_eq!(tokens[220], "Ġ");
        for m in &merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(
                tokens.contains(&a)
                    && tokens.contains(&b)
                    && tokens.contains(&format!("{a}{b}").as_str())
            );
        }
        let bos = f.get_u32("tokenizer.ggml.bos_token_id").unwrap() as usize;
        let eos = f.get_u32("tokenizer.ggml.eos_token_id").unwrap() as usize;
        assert_eq!(tokens[bos], "<|im_start|>");
        assert_eq!(tokens[eos], "<|im_end|>");
        assert_eq!(types[eos], 3);
        assert_eq!(types[0], 1);
        assert_eq!(types.iter().filter(|&&t| t == 3).count(), 3);
        assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
        assert_eq!(
            f.get_str("tokenizer.chat_template").unwrap(),
            CHATML_TEMPLATE
        );
    }

    // Deterministic per seed, different across seeds; file helper round-trips.
    let spec = TinyLlamaSpec::default();
    assert_eq!(tiny_llama_gguf(&spec), tiny_llama_gguf(&spec));
    let other = TinyLlamaSpec {
        seed: 43,
        ..TinyLlamaSpec::default()
    };
    assert_ne!(tiny_llama_gguf(&spec), tiny_llama_gguf(&other));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&spec, &path).unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().tensors().len(), 20);
}

// ---------------------------------------------------------------- real model

#[test]
fn real_smollm2_q4_1() {
    let Some(path) = real_model_path() else {
        eprintln!("note: SmolLM2-135M-Instruct.Q4_1.gguf not found (set BRIGADE_MODEL); skipping");
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(f.get_u32("llama.vocab_size").unwrap(), 49152);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert!(f
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));

    let embd = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.dtype, GgmlDType::Q8_0);
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.row_len(), 576);
    assert_eq!(embd.n_rows(), 49152);
    assert_eq!(embd.size_bytes, 576 / 32 * 34 * 49152);
    let q = f
        .tensor_with_dims("blk.0.attn_q.weight", &[576, 576])
        .unwrap();
    assert_eq!(q.dtype, GgmlDType::Q4_1);
    f.tensor_with_dims("blk.29.ffn_down.weight", &[1536, 576])
        .unwrap();
    let mut total = 0u64;
    for t in f.tensors() {
        assert_eq!(f.tensor_data(&t.name).unwrap().len() as u64, t.size_bytes);
        total += t.size_bytes;
    }
    assert!(total <= f.data_bytes());

    // Re-quantizing dequantized Q8_0 blocks reproduces them bit for bit (ggml's
    // reference quantizer is idempotent on its own output).
    let data = f.tensor_data("token_embd.weight").unwrap();
    let rows = &data[..embd.row_size_bytes() as usize * 64];
    let values = reference::dequantize(GgmlDType::Q8_0, rows, 576 * 64).unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    assert_eq!(reference::quantize(GgmlDType::Q8_0, &values).unwrap(), rows);

    // Q4_1 values decode finite and small.
    let w =
        reference::dequantize(q.dtype, f.info_data(q).unwrap(), q.n_elements() as usize).unwrap();
    assert!(w.iter().all(|v| v.is_finite() && v.abs() < 100.0));
}
