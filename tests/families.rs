//! Every architecture family on its tiny random model (`brigade::testing::family`):
//!
//! - parity with Hugging Face transformers in float32 on the same dequantized
//!   weights (`tests/fixtures/families/<family>.json`, made by
//!   `tests/reference/make_family_fixtures.py`): teacher-forced top-1 equal at
//!   every position (a reference near-tie, top-1 minus top-2 < [`NEAR_TIE`],
//!   is excepted and counted), |Δ logprob| of the reference's top-k tokens at
//!   most [`MAX_DLOGPROB`], greedy continuation equal (up to a near-tie);
//! - batch invariance: a sequence's logits are bit-identical alone (whole
//!   prefill) and in a mixed batch with other sequences (chunked prefill,
//!   decode rows, shuffled block tables);
//! - sliding windows really bound the reads: K/V blocks wholly before the
//!   window of every sliding layer are overwritten with NaN and the next
//!   decode step's logits do not change.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use brigade::gguf::GgufFile;
use brigade::model::kv::KvStore;
use brigade::model::llama::Scratch;
use brigade::model::Model;
use brigade::runner::Runner;
use brigade::testing::{
    load_family_fixture, tiny_family_gguf, FamilyFixture, TinyFamily, TinyFamilySpec,
};
use common::batch::{family_model as model, run_batch, tokens, Chunk};
use common::{engine_config, engine_outputs};

/// A reference top-1 / top-2 log-probability gap below this is a near-tie
/// (excepted and counted): our logprobs differ from the reference's by up to
/// ~1.3e-2 (see [`MAX_DLOGPROB`]), so two tokens closer than that may swap.
/// Measured: two such positions of 720 (qwen2; gaps from 1.01e-3), greedy
/// stops once each in gemma2 and qwen2.
const NEAR_TIE: f32 = 1e-2;

/// Largest allowed |our logprob - reference logprob| over the reference's
/// top-5 tokens at every position (two-digit Q8 activations and the f16 KV
/// cache against float32 activations). Measured maxima: llama 1.3e-2, phi3
/// 1.3e-2, gemma3 7.4e-3, qwen2 7.3e-3, gemma2 6.8e-3, llama3 6.7e-3,
/// mistral 5.8e-3, qwen3 2.9e-3.
const MAX_DLOGPROB: f32 = 0.03;

fn fixture(family: TinyFamily) -> Option<FamilyFixture> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(format!("{}.json", family.name()));
    if !p.is_file() {
        eprintln!(
            "note: {} absent; skipping {} parity (run tests/reference/make_family_fixtures.py)",
            p.display(),
            family.name()
        );
        return None;
    }
    Some(load_family_fixture(&p).expect("fixture"))
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = m + row
        .iter()
        .map(|&x| ((x - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32;
    row.iter().map(|&x| x - lse).collect()
}

fn argmax(row: &[f32]) -> u32 {
    brigade::sampling::argmax(row)
}

/// Compares one family with its fixture; prints the figures.
fn check_parity(family: TinyFamily) {
    let Some(fx) = fixture(family) else { return };
    let m = model(family);
    let vocab = m.config.vocab_size;
    let (mut positions, mut near_ties, mut max_d, mut greedy_steps, mut greedy_ties) =
        (0usize, 0usize, 0f32, 0usize, 0usize);
    for case in &fx.cases {
        let total = case.prompt_ids.len() + case.greedy_ids.len() + 1;
        let mut r = Runner::new(m.clone(), total, 2).expect("runner");
        let logits = r.feed(&case.prompt_ids, true).expect("feed");
        assert_eq!(
            case.positions.len(),
            case.prompt_ids.len(),
            "{}: fixture positions",
            case.name
        );
        for (i, want) in case.positions.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let lp = log_softmax(row);
            let top = argmax(row);
            positions += 1;
            if top != want.top_ids[0] {
                assert!(
                    want.margin() < NEAR_TIE,
                    "{} {} pos {i}: top-1 {top} vs reference {} (reference margin {})",
                    family.name(),
                    case.name,
                    want.top_ids[0],
                    want.margin()
                );
                near_ties += 1;
            }
            for (&id, &want_lp) in want.top_ids.iter().zip(&want.top_logprobs) {
                let d = (lp[id as usize] - want_lp).abs();
                max_d = max_d.max(d);
                assert!(
                    d <= MAX_DLOGPROB,
                    "{} {} pos {i} token {id}: logprob {} vs {want_lp}",
                    family.name(),
                    case.name,
                    lp[id as usize]
                );
            }
        }
        // Greedy continuation after the whole prompt.
        let mut next = argmax(&logits[(case.prompt_ids.len() - 1) * vocab..]);
        for (j, (&want, &margin)) in case.greedy_ids.iter().zip(&case.greedy_margins).enumerate() {
            greedy_steps += 1;
            if next != want {
                assert!(
                    margin < NEAR_TIE,
                    "{} {} greedy step {j}: {next} vs reference {want} (margin {margin})",
                    family.name(),
                    case.name
                );
                greedy_ties += 1;
                break; // the continuations diverge after a near-tie
            }
            let l = r.feed(&[next], false).expect("feed");
            next = argmax(&l);
        }
    }
    eprintln!(
        "{}: {positions} positions, top-1 equal except {near_ties} near-ties; max |Δ logprob| {max_d:.2e}; {greedy_steps} greedy steps ({greedy_ties} near-tie stops)",
        family.name()
    );
    assert!(positions > 0, "{}: fixture has no positions", family.name());
}

#[test]
fn llama_matches_transformers() {
    check_parity(TinyFamily::Llama);
}

#[test]
fn llama3_matches_transformers() {
    check_parity(TinyFamily::Llama3);
}

#[test]
fn mistral_matches_transformers() {
    check_parity(TinyFamily::Mistral);
}

#[test]
fn qwen2_matches_transformers() {
    check_parity(TinyFamily::Qwen2);
}

#[test]
fn qwen3_matches_transformers() {
    check_parity(TinyFamily::Qwen3);
}

#[test]
fn gemma2_matches_transformers() {
    check_parity(TinyFamily::Gemma2);
}

#[test]
fn gemma3_matches_transformers() {
    check_parity(TinyFamily::Gemma3);
}

#[test]
fn phi3_matches_transformers() {
    check_parity(TinyFamily::Phi3);
}

const BS: usize = 4;

fn kv_store(m: &Model, num_blocks: usize) -> KvStore {
    KvStore::new(
        0,
        m.config.n_layers,
        num_blocks,
        BS,
        m.config.kv_dim,
        m.config.head_dim,
    )
}

#[test]
fn every_family_is_batch_invariant() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    for family in TinyFamily::ALL {
        let m = model(family);
        let vocab = m.config.vocab_size;
        // A: 23 tokens (longer than the 8-token windows), B: 9, C: 14.
        let (a, b, c) = (
            tokens(1, 23, vocab),
            tokens(2, 9, vocab),
            tokens(3, 14, vocab),
        );
        // Alone: A's whole prefill, contiguous blocks, no pool.
        let table_alone: Vec<u32> = (0..6).collect();
        let mut kv = kv_store(&m, 6);
        let alone = run_batch(
            &m,
            &mut kv,
            &mut Scratch::default(),
            &[Chunk {
                pos: 0,
                tokens: &a,
                table: &table_alone,
            }],
            None,
        );
        // Mixed: interleaved block tables; A in chunks of 7 + 15 + one decode row.
        let ta: Vec<u32> = vec![9, 2, 14, 5, 0, 11];
        let tb: Vec<u32> = vec![3, 12, 7];
        let tc: Vec<u32> = vec![1, 8, 13, 4];
        let mut kv = kv_store(&m, 16);
        let mut s = Scratch::default();
        let mut got = Vec::new();
        let l = run_batch(
            &m,
            &mut kv,
            &mut s,
            &[
                Chunk {
                    pos: 0,
                    tokens: &b[..5],
                    table: &tb,
                },
                Chunk {
                    pos: 0,
                    tokens: &a[..7],
                    table: &ta,
                },
                Chunk {
                    pos: 0,
                    tokens: &c,
                    table: &tc,
                },
            ],
            Some(&pool),
        );
        got.extend_from_slice(&l[5 * vocab..12 * vocab]);
        let l = run_batch(
            &m,
            &mut kv,
            &mut s,
            &[
                Chunk {
                    pos: 7,
                    tokens: &a[7..22],
                    table: &ta,
                },
                Chunk {
                    pos: 5,
                    tokens: &b[5..],
                    table: &tb,
                },
            ],
            Some(&pool),
        );
        got.extend_from_slice(&l[..15 * vocab]);
        let l = run_batch(
            &m,
            &mut kv,
            &mut s,
            &[
                Chunk {
                    pos: 14,
                    tokens: &[c[0]],
                    table: &tc,
                },
                Chunk {
                    pos: 22,
                    tokens: &a[22..],
                    table: &ta,
                },
            ],
            None,
        );
        got.extend_from_slice(&l[vocab..2 * vocab]);
        assert_eq!(got.len(), alone.len());
        let same = got
            .iter()
            .zip(&alone)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{}: logits differ between alone and mixed batches",
            family.name()
        );
    }
}

/// Long contexts, whose attention rows are split into segments (1024 keys):
/// every row's logits are the same bits whole-prefill alone without a pool,
/// and in chunks and single decode rows on a 2-thread pool (a decode row's
/// segments then run as separate tasks) or without one; the decode rows
/// cross segment boundaries, with the 8-token windows of sliding layers
/// starting inside a segment.
#[test]
fn long_context_rows_are_invariant_to_segment_threads() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let seg = brigade::kernels::attention::seg_keys(BS);
    for family in [TinyFamily::Llama, TinyFamily::Gemma2, TinyFamily::Gemma3] {
        let m = model(family);
        let vocab = m.config.vocab_size;
        let n = 2 * seg + 12;
        let a = tokens(5, n, vocab);
        let nblk = n.div_ceil(BS);
        let table: Vec<u32> = (0..nblk as u32).rev().collect();
        let mut kv = kv_store(&m, nblk);
        let alone = run_batch(
            &m,
            &mut kv,
            &mut Scratch::default(),
            &[Chunk {
                pos: 0,
                tokens: &a,
                table: &table,
            }],
            None,
        );
        // Chunks up to just before the first boundary, decode rows across it
        // (pool, then none), a chunk to just before the second, decode rows.
        let mut kv = kv_store(&m, nblk);
        let mut s = Scratch::default();
        let mut got = run_batch(
            &m,
            &mut kv,
            &mut s,
            &[Chunk {
                pos: 0,
                tokens: &a[..seg - 3],
                table: &table,
            }],
            Some(&pool),
        );
        for p in seg - 3..seg + 6 {
            let pl = if p % 2 == 0 { Some(&pool) } else { None };
            got.extend(run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: p,
                    tokens: &a[p..p + 1],
                    table: &table,
                }],
                pl,
            ));
        }
        got.extend(run_batch(
            &m,
            &mut kv,
            &mut s,
            &[Chunk {
                pos: seg + 6,
                tokens: &a[seg + 6..2 * seg - 2],
                table: &table,
            }],
            Some(&pool),
        ));
        for p in 2 * seg - 2..n {
            got.extend(run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: p,
                    tokens: &a[p..p + 1],
                    table: &table,
                }],
                Some(&pool),
            ));
        }
        assert_eq!(got.len(), alone.len());
        for (r, (x, y)) in got.chunks(vocab).zip(alone.chunks(vocab)).enumerate() {
            assert!(
                x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}: row {r} differs",
                family.name()
            );
        }
    }
}

#[test]
fn sliding_window_layers_do_not_read_blocks_before_the_window() {
    for family in TinyFamily::ALL {
        let m = model(family);
        let Some(window) = m.config.sliding_window else {
            continue;
        };
        let vocab = m.config.vocab_size;
        let n = 3 * window + 5;
        let a = tokens(7, n + 1, vocab);
        let nblk = (n + 1).div_ceil(BS);
        let table: Vec<u32> = (0..nblk as u32).collect();
        let run = |poison: bool| {
            let mut kv = kv_store(&m, nblk);
            let mut s = Scratch::default();
            run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: 0,
                    tokens: &a[..n],
                    table: &table,
                }],
                None,
            );
            if poison {
                // The decode row at position n reads positions > n - window on
                // sliding layers: every block wholly before that is NaN there.
                let first_read = n + 1 - window;
                let nan = vec![f32::NAN; m.config.kv_dim];
                for l in (0..m.config.n_layers).filter(|&l| m.config.swa_layers[l]) {
                    for slot in 0..first_read / BS * BS {
                        kv.write(l, slot, &nan, &nan);
                    }
                }
            }
            run_batch(
                &m,
                &mut kv,
                &mut s,
                &[Chunk {
                    pos: n,
                    tokens: &a[n..],
                    table: &table,
                }],
                None,
            )
        };
        let (clean, poisoned) = (run(false), run(true));
        assert!(
            clean.iter().all(|v| v.is_finite()),
            "{}: clean logits",
            family.name()
        );
        let same = clean
            .iter()
            .zip(&poisoned)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{}: a sliding layer read K/V before its window",
            family.name()
        );
        eprintln!(
            "{}: window {window}, {} of {} layers sliding: reads bounded",
            family.name(),
            m.config.swa_layers.iter().filter(|&&s| s).count(),
            m.config.n_layers
        );
    }
}

#[test]
fn config_reads_every_family() {
    for family in TinyFamily::ALL {
        let spec = TinyFamilySpec::standard(family);
        let c = &model(family).config;
        assert_eq!(c.arch.name(), family.arch());
        assert_eq!(
            (c.head_dim, c.q_dim, c.kv_dim),
            (
                spec.head_dim as usize,
                spec.q_dim() as usize,
                spec.kv_dim() as usize
            ),
            "{}",
            family.name()
        );
        let swa: Vec<bool> = (0..spec.n_layers)
            .map(|i| spec.is_sliding_layer(i))
            .collect();
        assert_eq!(c.swa_layers, swa, "{}", family.name());
        assert_eq!(
            c.sliding_window,
            spec.sliding_window.map(|w| w as usize),
            "{}",
            family.name()
        );
        assert_eq!(c.attn_softcap, spec.attn_softcap, "{}", family.name());
        assert_eq!(c.final_softcap, spec.final_softcap, "{}", family.name());
    }
}

#[test]
fn unsupported_architecture_is_one_line() {
    let mut bytes = brigade::testing::tiny_llama_gguf(&brigade::testing::TinyLlamaSpec::default());
    // Rename the architecture value in place (same length: "llama" -> "mamba").
    let key_end = bytes
        .windows(20)
        .position(|w| w == b"general.architecture")
        .expect("key")
        + 20;
    let v = bytes[key_end..]
        .windows(5)
        .position(|w| w == b"llama")
        .expect("value")
        + key_end;
    bytes[v..v + 5].copy_from_slice(b"mamba");
    let file = Arc::new(GgufFile::from_bytes(bytes).expect("gguf"));
    let err = Model::from_gguf(file)
        .expect_err("mamba is not supported")
        .to_string();
    assert_eq!(
        err,
        "unsupported architecture `mamba` (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)"
    );
}

/// The real Gemma 3 270M (Q4_K_M mix) against transformers float32 on its
/// dequantized weights (`tests/fixtures/families/gemma3-270m-smoke.json`, made
/// by `tests/reference/make_gemma3_smoke.py`), through token ids (no
/// tokenizer involved): teacher-forced top-1 over prompt + continuation and
/// the greedy continuation. Skips when the model is not cached
/// (`scripts/fetch-model.sh gemma3-270m`).
#[test]
fn gemma3_270m_matches_transformers() {
    let Some(path) = common::gemma_model_path() else {
        return;
    };
    let fx_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families/gemma3-270m-smoke.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fx_path).expect("fixture")).expect("json");
    let file = Arc::new(GgufFile::open(&path).expect("open gemma"));
    let m = Arc::new(Model::from_gguf(file).expect("gemma model"));
    let vocab = m.config.vocab_size;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let (mut agree, mut total, mut max_d) = (0usize, 0usize, 0f64);
    for case in fx["cases"].as_array().expect("cases") {
        let (prompt, greedy, top1) = (ids(&case["ids"]), ids(&case["greedy"]), ids(&case["top1"]));
        let all: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let mut r = Runner::new(m.clone(), all.len(), 2).expect("runner");
        let logits = r.feed(&all, true).expect("feed");
        for (i, &want) in top1.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            total += 1;
            agree += usize::from(argmax(row) == want);
            if let (Some(&next), Some(lp)) = (
                all.get(i + 1),
                case["lp_of_next"].get(i).and_then(|v| v.as_f64()),
            ) {
                max_d = max_d.max((log_softmax(row)[next as usize] as f64 - lp).abs());
            }
        }
        // Greedy: every continuation token is our argmax after the previous ones.
        for (j, &want) in greedy.iter().enumerate() {
            let row = &logits[(prompt.len() - 1 + j) * vocab..(prompt.len() + j) * vocab];
            assert_eq!(argmax(row), want, "{}: greedy step {j}", case["prompt"]);
        }
    }
    eprintln!("gemma3-270m: teacher-forced top-1 {agree}/{total}; max |Δ logprob| of the next token {max_d:.3}");
    assert!(agree * 100 >= total * 95, "top-1 agreement {agree}/{total}");
}

/// Through the serving engine, every family: 16 concurrent greedy requests
/// (prompts longer than the 8-token windows, shared prefixes) with 2
/// workers, 5-token prefill chunks, prefix caching and a KV pool small
/// enough to force preemption give, bit for bit, the tokens and logprobs of
/// each request run alone on 1 worker.
#[test]
fn every_family_is_batch_invariant_through_the_engine() {
    use brigade::engine::{Engine, GenerateRequest, SamplingParams};
    let prompts: Vec<String> = (0..8)
        .flat_map(|i| {
            let base = format!("the cat and the dog {i} went to the river in the morning");
            [
                base.clone(),
                format!("{base} and then it rained on them all"),
            ]
        })
        .collect();
    let p = SamplingParams {
        logprobs: Some(0),
        ..SamplingParams::greedy(10)
    };
    for family in TinyFamily::ALL {
        let bytes = tiny_family_gguf(&TinyFamilySpec::standard(family));
        let file = Arc::new(GgufFile::from_bytes(bytes).expect("gguf"));
        let tok = Arc::new(brigade::tokenizer::Tokenizer::from_gguf(&file).expect("tokenizer"));
        let m = Arc::new(Model::from_gguf(file).expect("model"));
        let h = Engine::start(m.clone(), tok.clone(), engine_config(1, 0, 4096, false))
            .expect("engine");
        let alone: Vec<_> = prompts
            .iter()
            .map(|t| {
                engine_outputs(
                    h.submit(GenerateRequest::text(t.clone(), p.clone()))
                        .expect("submit"),
                )
            })
            .collect();
        drop(h);
        let h = Engine::start(m, tok, engine_config(2, 5, 192, true)).expect("engine");
        let streams: Vec<_> = prompts
            .iter()
            .map(|t| {
                h.submit(GenerateRequest::text(t.clone(), p.clone()))
                    .expect("submit")
            })
            .collect();
        let got: Vec<_> = streams.into_iter().map(engine_outputs).collect();
        for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
            assert_eq!(a.len(), 10, "{}: request {i} length", family.name());
            assert_eq!(
                g,
                a,
                "{}: request {i} differs from running alone",
                family.name()
            );
        }
        let s = h.stats();
        assert!(
            s.preemptions > 0,
            "{}: expected preemptions, stats {s:?}",
            family.name()
        );
        eprintln!(
            "{}: engine batch invariance ok ({} preemptions)",
            family.name(),
            s.preemptions
        );
    }
}

/// `brigade inspect`, `generate` and `serve` (a completion and a chat request
/// over HTTP) on a generated model of every family, and on Gemma 3 270M when
/// it is present (a base model without a chat template: completion only).
#[test]
fn inspect_generate_and_serve_work_on_every_family() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut models: Vec<(String, PathBuf, bool)> = TinyFamily::ALL
        .iter()
        .map(|&family| {
            let path = dir.path().join(format!("{}.gguf", family.name()));
            std::fs::write(&path, tiny_family_gguf(&TinyFamilySpec::standard(family)))
                .expect("write gguf");
            (family.name().to_string(), path, true)
        })
        .collect();
    if let Some(p) = common::gemma_model_path() {
        models.push(("gemma3-270m".to_string(), p, false));
    }
    let bin = env!("CARGO_BIN_EXE_brigade");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (name, path, chat) in &models {
        let out = std::process::Command::new(bin)
            .args(["inspect", "--model"])
            .arg(path)
            .output()
            .expect("inspect");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("cannot run"),
            "{name}: inspect\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new(bin)
            .args(["generate", "--prompt", "The colors are", "--max-tokens", "4", "--model"])
            .arg(path)
            .output()
            .expect("generate");
        assert!(
            out.status.success(),
            "{name}: generate\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--port", "0", "--model"])
            .arg(path)
            .env("RUST_LOG", "warn")
            .env_remove("BRIGADE_API_KEY")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve");
        let base = common::wait_listening(&mut child);
        rt.block_on(async {
            let http = reqwest::Client::new();
            let mut calls = vec![(
                "/v1/completions",
                serde_json::json!({"prompt": "The colors are", "max_tokens": 4, "temperature": 0}),
            )];
            if *chat {
                calls.push((
                    "/v1/chat/completions",
                    serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 4, "temperature": 0}),
                ));
            }
            for (route, body) in calls {
                let r = http
                    .post(format!("{base}{route}"))
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.expect("json body");
                assert_eq!(status, 200, "{name} {route}: {v}");
                let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                assert!((1..=4).contains(&n), "{name} {route}: {v}");
            }
        });
        let _ = child.kill();
        let _ = child.wait();
    }
}
