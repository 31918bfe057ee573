//! The AMX tile kernel of the packed matmul against the AVX-512 VNNI kernel
//! and the scalar reference (`matmul_packed_opts` with `Isa::Scalar` runs
//! `packed::ref_dot`): bit-identical outputs for every packed dtype, on odd
//! shapes (batch rows not a multiple of the 16-row tile, zero-padded tail
//! tiles, output columns not a multiple of the 16-column group, 1 to 64
//! blocks per row), a row's output
//! identical whatever the batch it is in (AMX for full 16-row tiles, VNNI for
//! the rest), for one and two threads. Skipped, with the reason printed, where
//! the CPU or the OS offers no AMX.

use half::f16;
use rand::{Rng, SeedableRng};

use brigade::kernels::{self, Activations, BlockQ8, Isa, PackedMatrix, QMatrix, QK};
use brigade::quant::GgmlDType;

/// `true` (after printing why) when this machine cannot run the AMX kernel.
fn skip() -> bool {
    if kernels::detected_isa() != Isa::Avx512Vnni || !kernels::amx_available() {
        eprintln!("skipped: no AMX-INT8 on this CPU (or the OS refused the tile state); the VNNI kernel is in use");
        return true;
    }
    false
}

/// Byte offsets of a block's f16 scales and the range each gets.
fn scale_fields(dtype: GgmlDType) -> Vec<(usize, std::ops::Range<f32>)> {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => vec![(0, 0.001..0.05), (2, -0.2..0.0)],
        GgmlDType::Q4_K | GgmlDType::Q5_K => vec![(0, 0.0005..0.002), (2, 0.0..0.003)],
        GgmlDType::Q2_K => vec![(80, 0.001..0.01), (82, 0.0..0.01)],
        GgmlDType::Q3_K => vec![(108, 0.0005..0.002)],
        GgmlDType::Q6_K => vec![(208, 0.0002..0.001)],
        GgmlDType::IQ4_XS => vec![(0, 0.0001..0.001)],
        _ => vec![(0, 0.001..0.05)],
    }
}

/// Random raw blocks: random quant and sub-scale bytes, small finite scales.
fn weights(rng: &mut rand::rngs::SmallRng, dtype: GgmlDType, rows: usize, cols: usize) -> Vec<u8> {
    let ts = dtype.type_size();
    let mut out = Vec::with_capacity(rows * cols / dtype.block_size() * ts);
    for _ in 0..rows * cols / dtype.block_size() {
        let mut blk: Vec<u8> = (0..ts).map(|_| rng.gen::<u8>()).collect();
        for (at, range) in scale_fields(dtype) {
            blk[at..at + 2].copy_from_slice(&f16::from_f32(rng.gen_range(range)).to_le_bytes());
        }
        out.extend_from_slice(&blk);
    }
    out
}

/// The quantized dtypes (all have a packed kind).
fn dtypes() -> impl Iterator<Item = GgmlDType> {
    GgmlDType::ALL.into_iter().filter(|d| d.block_size() > 1)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Outputs of the packed matmul for `n` rows of `xq`.
fn run(
    isa: Isa,
    amx: bool,
    p: &PackedMatrix,
    xq: &[BlockQ8],
    n: usize,
    pool: Option<&rayon::ThreadPool>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * p.rows()];
    kernels::matmul_packed_opts(
        isa,
        amx,
        p,
        &Activations { f: &[], q: xq, n },
        &mut out,
        pool,
    );
    out
}

/// Random Q8 activations for `n` rows of `cols` inputs.
fn activations(rng: &mut rand::rngs::SmallRng, n: usize, cols: usize) -> Vec<BlockQ8> {
    let xf: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut xq = vec![BlockQ8::default(); n * cols / QK];
    kernels::quantize_rows_q8(&xf, cols, &mut xq);
    xq
}

#[test]
fn amx_matches_vnni_and_scalar_bit_for_bit() {
    if skip() {
        return;
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(41);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // (output columns, inputs, batch rows): 1..64 blocks, ragged groups and tiles.
    // Batches under 16 rows and the tails of 16-row tiles run on zero-padded
    // tiles (12 rows and more, `AMX_MIN_ROWS`) or VNNI (fewer).
    let shapes = [
        (16usize, 32usize, 16usize),
        (17, 64, 17),
        (40, 96, 33),
        (5, 256, 16),
        (100, 512, 47),
        (33, 2048, 20),
        (64, 768, 80),
        (24, 256, 5),
        (31, 160, 13),
        (18, 512, 70),
        (9, 64, 4),
    ];
    for dtype in dtypes() {
        for &(rows, cols, n) in &shapes {
            if !cols.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let data = weights(&mut rng, dtype, rows, cols);
            let p = PackedMatrix::new(&QMatrix::new(dtype, rows, cols, &data).unwrap()).unwrap();
            let xq = activations(&mut rng, n, cols);
            let want = bits(&run(Isa::Scalar, false, &p, &xq, n, None));
            let vnni = bits(&run(Isa::Avx512Vnni, false, &p, &xq, n, None));
            assert_eq!(vnni, want, "{dtype:?} {rows}x{cols} n{n}: VNNI vs scalar");
            for pool in [None, Some(&pool)] {
                let got = bits(&run(Isa::Avx512Vnni, true, &p, &xq, n, pool));
                if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                    panic!(
                        "{dtype:?} {rows}x{cols} n{n} threads {}: AMX row {} col {}: {} vs {}",
                        if pool.is_some() { 2 } else { 1 },
                        i / rows,
                        i % rows,
                        f32::from_bits(got[i]),
                        f32::from_bits(want[i])
                    );
                }
            }
        }
    }
}

#[test]
fn amx_rows_do_not_depend_on_the_batch() {
    if skip() {
        return;
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(43);
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_K,
        GgmlDType::Q6_K,
        GgmlDType::Q5_0,
    ] {
        let (rows, cols, n) = (48, 512, 90);
        let data = weights(&mut rng, dtype, rows, cols);
        let p = PackedMatrix::new(&QMatrix::new(dtype, rows, cols, &data).unwrap()).unwrap();
        let xq = activations(&mut rng, n, cols);
        let nb = cols / QK;
        let all = bits(&run(Isa::Avx512Vnni, true, &p, &xq, n, None));
        // Sub-batches of sizes around the 16-row tile at shifting offsets: a
        // row lands in AMX tiles for some and in the VNNI remainder for others.
        let mut start = 0;
        for len in [1usize, 16, 15, 17, 31, 32, 3, 20].into_iter().cycle() {
            if start >= n {
                break;
            }
            let len = len.min(n - start);
            let part = bits(&run(
                Isa::Avx512Vnni,
                true,
                &p,
                &xq[start * nb..(start + len) * nb],
                len,
                None,
            ));
            assert_eq!(
                &all[start * rows..(start + len) * rows],
                &part[..],
                "{dtype:?} rows {start}..{}",
                start + len
            );
            start += len;
        }
    }
}
