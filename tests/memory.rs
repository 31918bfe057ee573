//! Memory under hostile load, measured on the `brigade serve` process from
//! `/proc/PID/status` (VmRSS now, VmHWM = peak): the real SmolLM2 model.
//!
//! Goals (issue 10, observation 3): no single request raises the peak by more
//! than its own KV blocks and one logits row per sequence need (plus the fixed
//! scratch of one prompt-logprob chunk and the request's own bytes), and RSS
//! comes back to within 50 MB of its idle figure after any burst (the engine
//! gives its KV pages back after `kv_cache.release_idle_s` of idleness).
//!
//! Every figure is printed (the closing note quotes them); bounds are generous
//! multiples of what the request needs, so the test fails on a regression to
//! full-vocabulary rows per prompt token or to kept KV pages, not on noise.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

const MIB: f64 = 1024.0 * 1024.0;

struct Child {
    child: std::process::Child,
    base: String,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(VmRSS, VmHWM)` in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak (VmHWM) to the current RSS (Linux: write 5 to clear_refs).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn start(model: &std::path::Path) -> Child {
    let dir = std::env::temp_dir().join(format!("brigade-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cfg.toml");
    std::fs::write(
        &cfg,
        "[kv_cache]\nrelease_idle_s = 1.0\n[server]\nport = 0\nmax_connections = 4096\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brigade"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--model")
        .arg(model)
        .env("RUST_LOG", "error")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::wait_listening(&mut child);
    Child { child, base }
}

/// Waits (bounded) until RSS is within `margin` MiB of `idle`; returns the last reading.
async fn settles(pid: u32, idle: f64, margin: f64) -> f64 {
    let t0 = Instant::now();
    loop {
        let (now, _) = rss(pid);
        if now <= idle + margin || t0.elapsed() > Duration::from_secs(30) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn rss_stays_bounded_and_returns_to_idle_after_bursts() {
    let Some(model) = common::model_path() else {
        return;
    };
    let srv = start(&model);
    let pid = srv.child.id();
    let base = srv.base.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        // Warm up (first-request allocations: thread pools, tokenizer caches), then let it go idle.
        let r = client.post(format!("{base}/v1/completions")).json(&json!({"prompt": "Hello", "max_tokens": 4})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (idle, _) = rss(pid);
        eprintln!("idle RSS {idle:.0} MiB");

        // 1. echo + logprobs over a ~2,000-token prompt, n = 4.
        let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(200);
        reset_peak(pid);
        let (before, _) = rss(pid);
        let body = json!({"prompt": prompt, "max_tokens": 4, "echo": true, "logprobs": 5, "n": 4});
        let r = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        let n_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
        assert!(n_prompt > 1500.0, "{n_prompt}");
        let (_, peak) = rss(pid);
        // Its own needs: KV for 4 × (prompt + 4) tokens (SmolLM2: 30 layers × 2 × 192 × f16 = 22.5 KiB per token,
        // siblings share the prompt blocks), 4 logits rows, one 32-row logprob chunk (6 MiB), plus the JSON
        // of its answer (~2,000 × top-5 entries) and the prompt text.
        let kv = (n_prompt + 4.0 * 4.0) * 30.0 * 2.0 * 192.0 * 2.0 / MIB;
        let need = kv + 4.0 * 49152.0 * 4.0 / MIB + 6.0;
        eprintln!("echo+logprobs n=4 over {n_prompt} tokens: RSS {before:.0} -> peak {peak:.0} MiB (+{:.0}; own KV {kv:.0} MiB, needs ~{need:.0})", peak - before);
        assert!(peak - before < need + 80.0, "peak grew by {:.0} MiB (needs ~{need:.0})", peak - before);
        let after = settles(pid, idle, 50.0).await;
        eprintln!("  after idle release: {after:.0} MiB (idle {idle:.0})");
        assert!(after <= idle + 50.0, "RSS {after:.0} MiB stayed above idle {idle:.0} + 50");

        // 2. Eight concurrent prompts far over the context limit (3.5 MB each): refused unread.
        reset_peak(pid);
        let (before, _) = rss(pid);
        let huge = "word ".repeat(700_000);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (client, base, huge) = (client.clone(), base.clone(), huge.clone());
            tasks.push(tokio::spawn(async move {
                let r = client.post(format!("{base}/v1/completions")).json(&json!({"prompt": huge, "max_tokens": 4})).send().await.unwrap();
                let st = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap();
                (st, v)
            }));
        }
        for t in tasks {
            let (st, v) = t.await.unwrap();
            assert_eq!(st, 400, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("maximum context length"), "{v}");
        }
        let (_, peak) = rss(pid);
        eprintln!("8 x 3.5 MB over-context prompts: RSS {before:.0} -> peak {peak:.0} MiB (+{:.0})", peak - before);
        // The bodies themselves (8 × 3.5 MB, read and parsed) are all they may cost.
        assert!(peak - before < 8.0 * 3.5 * 4.0 + 40.0, "peak grew by {:.0} MiB", peak - before);
        let after = settles(pid, idle, 50.0).await;
        eprintln!("  after: {after:.0} MiB");
        assert!(after <= idle + 50.0, "RSS {after:.0} MiB stayed above idle {idle:.0} + 50");

        // 3. 300 streams, a third of them dropped after their first chunk.
        reset_peak(pid);
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let body = json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 24, "stream": true, "ignore_eos": true});
                let r = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
                let st = r.status().as_u16();
                use futures_util::StreamExt;
                let mut s = r.bytes_stream();
                if i % 3 == 0 {
                    let _ = s.next().await; // then drop: a disconnect mid-stream
                    return st;
                }
                while let Some(c) = s.next().await {
                    if c.is_err() {
                        break;
                    }
                }
                st
            }));
        }
        for t in tasks {
            let st = t.await.unwrap();
            assert!(st == 200 || st == 429, "{st}");
        }
        let (_, peak) = rss(pid);
        eprintln!("300 streams with disconnects: peak {peak:.0} MiB");
        let after = settles(pid, idle, 50.0).await;
        eprintln!("  after idle release: {after:.0} MiB (idle {idle:.0})");
        assert!(after <= idle + 50.0, "RSS {after:.0} MiB stayed above idle {idle:.0} + 50");
    });
}
