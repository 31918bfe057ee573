//! Tensor formats against gguf-py: every [`GgmlDType`]'s scalar reference
//! dequantizer reproduces `gguf.quants.dequantize` bit for bit on the fixtures
//! of `tests/reference/make_quant_fixtures.py` (seeded random blocks), the
//! reference quantizers reproduce `gguf.quants.quantize`, a GGUF
//! file holding every type parses, a model may use any 32-element type for
//! its weights, and every matmul kernel (each ISA, raw and packed) equals the
//! f32 dot product of gguf-py's dequantized weights with the activations
//! within the two-digit activation error budget, on the fixtures and (when
//! cached) on the real Gemma 3 270M Q4_K_M tensors. An ignored test checks
//! the dequantization of every tensor of that file against gguf-py
//! (`cargo test --test quant -- --ignored`).

use std::path::PathBuf;
use std::sync::Arc;

use brigade::gguf::{GgufFile, GgufWriter};
use brigade::kernels::{self, Activations, BlockQ8, PackedMatrix, QMatrix, QK};
use brigade::model::Model;
use brigade::quant::{dequantize_row, reference, GgmlDType};
use brigade::testing::{tiny_llama_gguf, TinyLlamaSpec};

/// One fixture: the tensor bytes of a type and gguf-py's f32 outputs.
struct Fixture {
    bytes: Vec<u8>,
    bits: Vec<u32>,
}

fn fixture(dtype: GgmlDType) -> Fixture {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "quant",
        &format!("{}.json", dtype.name()),
    ]
    .iter()
    .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["type"], dtype.name());
    assert_eq!(v["ggml_type"], dtype.raw(), "{dtype:?}: ggml id");
    assert_eq!(v["block_size"], dtype.block_size(), "{dtype:?}: block size");
    assert_eq!(v["type_size"], dtype.type_size(), "{dtype:?}: type size");
    let bytes = hex::decode(v["bytes"].as_str().unwrap()).unwrap();
    let bits: Vec<u32> = f32s(v["f32_bits"].as_str().unwrap())
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let n = v["n_elements"].as_u64().unwrap();
    assert_eq!(bits.len() as u64, n);
    assert_eq!(
        dtype.bytes_for(n),
        Some(bytes.len() as u64),
        "{dtype:?}: fixture byte count"
    );
    Fixture { bytes, bits }
}

/// Index, ours and gguf-py's bits of the first differing element (`None` if equal).
fn first_mismatch(dtype: GgmlDType, bytes: &[u8], expected: &[u32]) -> Option<(usize, u32, u32)> {
    let mut out = vec![f32::NAN; expected.len()];
    dequantize_row(dtype, bytes, &mut out);
    out.iter()
        .zip(expected)
        .enumerate()
        .find(|(_, (a, &b))| a.to_bits() != b)
        .map(|(i, (a, &b))| (i, a.to_bits(), b))
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    for dtype in GgmlDType::ALL {
        let f = fixture(dtype);
        if let Some((i, got, want)) = first_mismatch(dtype, &f.bytes, &f.bits) {
            panic!(
                "{}: element {i} (block {}): got {got:08x} ({}), gguf-py {want:08x} ({})",
                dtype.name(),
                i / dtype.block_size(),
                f32::from_bits(got),
                f32::from_bits(want)
            );
        }
        // The checked reference decoder says the same.
        let y = reference::dequantize(dtype, &f.bytes, f.bits.len()).unwrap();
        assert!(
            y.iter().zip(&f.bits).all(|(a, &b)| a.to_bits() == b),
            "{dtype:?}"
        );
    }
}

#[test]
fn the_fixtures_can_fail() {
    // Flipped low bits change some output: the comparison is not vacuous.
    for dtype in GgmlDType::ALL {
        let f = fixture(dtype);
        let bytes: Vec<u8> = f.bytes.iter().map(|b| b ^ 0x01).collect();
        assert!(
            first_mismatch(dtype, &bytes, &f.bits).is_some(),
            "{dtype:?}: a corrupted block still matches"
        );
    }
}

/// Hex of 8-digit u32s -> f32 values.
fn f32s(hex_bits: &str) -> Vec<f32> {
    (0..hex_bits.len() / 8)
        .map(|i| f32::from_bits(u32::from_str_radix(&hex_bits[8 * i..8 * i + 8], 16).unwrap()))
        .collect()
}

#[test]
fn quantize_matches_gguf_py_bit_for_bit() {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "quant",
        "quantize.json",
    ]
    .iter()
    .collect();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v.as_object().unwrap();
    // Every quantizer but F32's identity has a case.
    let mut names: Vec<&str> = cases.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = reference::QUANTIZABLE
        .iter()
        .filter(|d| **d != GgmlDType::F32)
        .map(|d| d.name())
        .collect();
    want.sort_unstable();
    assert_eq!(names, want);
    for (name, case) in cases {
        let dtype = GgmlDType::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .unwrap();
        let x = f32s(case["input_f32_bits"].as_str().unwrap());
        let expected = hex::decode(case["bytes"].as_str().unwrap()).unwrap();
        let got = reference::quantize(dtype, &x).unwrap();
        let tb = dtype.type_size();
        if let Some(b) = (0..expected.len() / tb)
            .find(|&b| got[b * tb..(b + 1) * tb] != expected[b * tb..(b + 1) * tb])
        {
            panic!(
                "{name}: block {b}: got {:02x?}, gguf-py {:02x?}",
                &got[b * tb..(b + 1) * tb],
                &expected[b * tb..(b + 1) * tb]
            );
        }
        assert_eq!(got.len(), expected.len(), "{name}");
    }
}

/// A GGUF holding one tensor of every type, with the fixtures' bytes.
fn every_type_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add(
        "general.architecture",
        brigade::gguf::MetaValue::Str("none".into()),
    );
    for dtype in GgmlDType::ALL {
        let f = fixture(dtype);
        w.add_tensor(
            format!("t.{}", dtype.name()),
            &[f.bits.len() as u64],
            dtype,
            f.bytes,
        );
    }
    w.to_bytes()
}

#[test]
fn a_gguf_with_every_type_parses_and_dequantizes() {
    let file = GgufFile::from_bytes(every_type_gguf()).unwrap();
    assert_eq!(file.tensors().len(), GgmlDType::ALL.len());
    for dtype in GgmlDType::ALL {
        let f = fixture(dtype);
        let name = format!("t.{}", dtype.name());
        let info = file.tensor_info(&name).unwrap();
        assert_eq!(info.dtype, dtype);
        let data = file.tensor_data(&name).unwrap();
        assert_eq!(data, &f.bytes[..], "{name}");
        assert_eq!(first_mismatch(dtype, data, &f.bits), None, "{name}");
    }
}

/// The tiny model with `blk.0.attn_q.weight` stored as `dtype` (zero blocks)
/// and one extra tensor of every type.
fn tiny_model_with(dtype: GgmlDType) -> Vec<u8> {
    let src = GgufFile::from_bytes(tiny_llama_gguf(&TinyLlamaSpec::default())).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        if k != "general.alignment" {
            w.add(k, v.clone());
        }
    }
    for t in src.tensors() {
        if t.name == "blk.0.attn_q.weight" {
            let n: u64 = t.dims.iter().product();
            let len = dtype.bytes_for(n).unwrap() as usize;
            w.add_tensor(&t.name, &t.dims, dtype, vec![0; len]);
        } else {
            w.add_tensor(
                &t.name,
                &t.dims,
                t.dtype,
                src.tensor_data(&t.name).unwrap().to_vec(),
            );
        }
    }
    for d in GgmlDType::ALL {
        let f = fixture(d);
        w.add_tensor(
            format!("extra.{}", d.name()),
            &[f.bits.len() as u64],
            d,
            f.bytes,
        );
    }
    w.to_bytes()
}

#[test]
fn every_32_element_weight_type_loads_in_the_model() {
    // The tiny model's rows are 64 wide: the 32-element formats fit (rows of
    // K-quants must be multiples of 256; the GGUF reader refuses others).
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::IQ4_NL,
    ] {
        let file = GgufFile::from_bytes(tiny_model_with(dtype)).unwrap();
        if let Err(e) = Model::from_gguf(Arc::new(file)) {
            panic!("{dtype:?}: {e}");
        }
    }
}

#[test]
fn cli_inspect_lists_every_type_and_generate_runs_a_q5_0_weight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q5_0.gguf");
    std::fs::write(&path, tiny_model_with(GgmlDType::Q5_0)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .arg("inspect")
        .arg("--model")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in GgmlDType::ALL {
        let line = format!("extra.{}", d.name());
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&line) && l.contains(d.name())),
            "{line} not listed:\n{stdout}"
        );
    }
    assert!(!stdout.contains("cannot run"), "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["generate", "--prompt", "hi", "--max-tokens", "2", "--model"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
}

#[test]
#[ignore = "needs gemma-3-270m-q4_k_m.gguf in the model cache (the Gemma 3 270M Q4_K_M of issue 11)"]
fn real_model_tensors_dequantize_like_gguf_py() {
    // Every tensor but token_embd of a real Q4_K_M mix (F32, Q4_K, Q5_0, Q6_K,
    // Q8_0), hashed as make_quant_fixtures.py --gguf hashes gguf-py's output.
    use sha2::{Digest, Sha256};
    let path = brigade::paths::model_cache_dir().join("gemma-3-270m-q4_k_m.gguf");
    let fixture: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "quant",
        "real",
        "gemma-3-270m-q4_k_m.json",
    ]
    .iter()
    .collect();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = v["tensors"].as_object().unwrap();
    assert_eq!(tensors.len() + 1, file.tensors().len());
    for (name, want) in tensors {
        let info = file.tensor_info(name).unwrap();
        assert_eq!(want["type"], info.dtype.name(), "{name}");
        let n: u64 = info.dims.iter().product();
        assert_eq!(want["n_elements"], n, "{name}");
        let mut out = vec![f32::NAN; n as usize];
        dequantize_row(info.dtype, file.tensor_data(name).unwrap(), &mut out);
        let mut h = Sha256::new();
        out.iter().for_each(|x| h.update(x.to_le_bytes()));
        assert_eq!(
            hex::encode(h.finalize()),
            want["sha256"].as_str().unwrap(),
            "{name} ({})",
            info.dtype.name()
        );
    }
}

/// Checks every kernel for `w` (each available ISA on the raw blocks, and the
/// packed kernel when the dtype has one) against the f64 dot product of the
/// exact weights `exact` (row-major, gguf-py's values) with 3 activation rows
/// in [-1, 1]: the error of two-digit Q8 activations is at most half a
/// second-digit step, `amax / (127 * 256)`, per element (the bound below
/// allows twice that, plus f32 rounding); the packed copy dequantizes
/// bit-identically.
fn check_kernels_against_exact(what: &str, w: &QMatrix<'_>, exact: &[f32]) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(23);
    let (rows, cols, n) = (w.rows, w.cols, 3);
    let xf: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut xq = vec![BlockQ8::default(); n * cols / QK];
    kernels::quantize_rows_q8(&xf, cols, &mut xq);
    let x = Activations { f: &xf, q: &xq, n };
    let packed = PackedMatrix::new(w).ok();
    if let Some(p) = &packed {
        let mut got = vec![f32::NAN; cols];
        for o in 0..rows {
            p.dequantize_row(o, &mut got);
            let same = got
                .iter()
                .zip(&exact[o * cols..(o + 1) * cols])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{what}: packed row {o} does not dequantize like gguf-py"
            );
        }
    }
    for isa in kernels::available_isas() {
        for p in [None, packed.as_ref()] {
            let mut out = vec![f32::NAN; n * rows];
            match p {
                Some(p) => kernels::matmul_packed_isa(isa, p, &x, &mut out, None),
                None => kernels::matmul_isa(isa, w, &x, &mut out, None),
            }
            for r in 0..n {
                let xr = &xf[r * cols..(r + 1) * cols];
                for o in 0..rows {
                    let wr = &exact[o * cols..(o + 1) * cols];
                    let want: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let l1: f64 = wr.iter().map(|v| v.abs() as f64).sum();
                    let tol = l1 / (127.0 * 128.0) + 1e-5 * (1.0 + want.abs());
                    let got = out[r * rows + o] as f64;
                    assert!(
                        (got - want).abs() <= tol,
                        "{what} {isa:?} packed={}: r{r} o{o}: {got} vs {want} (tol {tol})",
                        p.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn every_kernel_equals_the_dot_of_gguf_py_weights_on_the_fixtures() {
    for dtype in GgmlDType::ALL {
        if dtype.block_size() == 1 {
            continue;
        }
        let f = fixture(dtype);
        let cols = if dtype.block_size() == 256 { 256 } else { 64 };
        let exact: Vec<f32> = f.bits.iter().map(|&b| f32::from_bits(b)).collect();
        let w = QMatrix::new(dtype, exact.len() / cols, cols, &f.bytes).unwrap();
        check_kernels_against_exact(dtype.name(), &w, &exact);
    }
}

#[test]
fn every_kernel_equals_the_dot_of_dequantized_weights_on_the_real_gemma_tensors() {
    let path = brigade::paths::model_cache_dir().join("gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        eprintln!(
            "skipping: {} not cached (scripts/fetch-model.sh gemma3-270m)",
            path.display()
        );
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for t in file.tensors() {
        if t.dims.len() != 2 || t.dtype.block_size() == 1 {
            continue;
        }
        // The first 32 rows of every quantized matrix.
        let (cols, rows) = (t.dims[0] as usize, (t.dims[1] as usize).min(32));
        let data = file.tensor_data(&t.name).unwrap();
        let row_bytes = cols / t.dtype.block_size() * t.dtype.type_size();
        let w = QMatrix::new(t.dtype, rows, cols, &data[..rows * row_bytes]).unwrap();
        let mut exact = vec![0.0f32; rows * cols];
        dequantize_row(t.dtype, w.data, &mut exact);
        check_kernels_against_exact(&t.name, &w, &exact);
        seen.insert(t.dtype.name());
    }
    // The Q4_K_M mix.
    for d in ["Q4_K", "Q5_0", "Q6_K", "Q8_0"] {
        assert!(
            seen.contains(d),
            "no {d} matrix in {}: {seen:?}",
            path.display()
        );
    }
}
