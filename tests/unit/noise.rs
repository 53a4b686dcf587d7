//! `tt_scale::noise` against real PyTorch: golden values made by
//! `tools/reference/make_noise_golden.py` (PyTorch 2.15, x86-64 with AVX-512) and stored as float32
//! bit patterns in `tests/fixtures/noise/`.

use serde_json::Value;
use sha2::{Digest, Sha256};
use tt_scale::noise::{torch_randn, Mt19937, RandnKernel};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/noise/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    u64s(v).into_iter().map(|x| x as u32).collect()
}

fn shape_of(case: &Value) -> Vec<usize> {
    u64s(&case["shape"])
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

/// Distance in units in the last place between two float32 bit patterns.
fn ulps(a: u32, b: u32) -> u64 {
    let ordered = |x: u32| -> i64 {
        if x >> 31 == 1 {
            -i64::from(x & 0x7fff_ffff)
        } else {
            i64::from(x)
        }
    };
    (ordered(a) - ordered(b)).unsigned_abs()
}

/// Pairs (ours, torch's) of float32 bit patterns for every stored element of a fixture case,
/// plus the whole-tensor checks (SHA-256 of the bytes, float64 sum) where the case has them.
struct Compared {
    pairs: Vec<(u32, u32)>,
    hash_equal: Option<bool>,
    sum_error: Option<f64>,
}

fn compare_case(case: &Value, kernel: RandnKernel) -> Compared {
    let seed = case["seed"].as_u64().unwrap();
    let shape = shape_of(case);
    let noise = torch_randn(seed, &shape, kernel);
    assert_eq!(noise.shape, shape);
    assert_eq!(noise.data.len(), shape.iter().product::<usize>());
    let ours: Vec<u32> = noise.data.iter().map(|x| x.to_bits()).collect();
    if let Some(all) = case.get("bits") {
        let theirs = u32s(all);
        assert_eq!(theirs.len(), ours.len());
        return Compared {
            pairs: ours.into_iter().zip(theirs).collect(),
            hash_equal: None,
            sum_error: None,
        };
    }
    let n = ours.len();
    let mut pairs = Vec::new();
    let head = u32s(&case["head"]);
    pairs.extend(ours[..head.len()].iter().copied().zip(head.iter().copied()));
    let tail = u32s(&case["tail"]);
    pairs.extend(
        ours[n - tail.len()..]
            .iter()
            .copied()
            .zip(tail.iter().copied()),
    );
    let index = u64s(&case["strided_index"]);
    let strided = u32s(&case["strided"]);
    pairs.extend(index.iter().map(|&i| ours[i as usize]).zip(strided));
    let bytes: Vec<u8> = noise.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let hash = format!("{:x}", Sha256::digest(&bytes));
    let sum: f64 = noise.data.iter().map(|&x| f64::from(x)).sum();
    Compared {
        pairs,
        hash_equal: Some(hash == case["sha256_f32le"].as_str().unwrap()),
        sum_error: Some((sum - case["sum_f64"].as_f64().unwrap()).abs()),
    }
}

#[test]
fn mt19937_1994_reduced_mod_2147483647_is_the_original_tools_seed_sequence() {
    let mut rng = Mt19937::new(1994);
    let seq: Vec<u32> = (0..13).map(|_| rng.next_u32() % 2_147_483_647).collect();
    assert_eq!(
        seq[..8],
        [
            1669720502, 520809828, 66447394, 704610508, 1920635217, 1533830619, 1458547788,
            2095113941
        ]
    );
    assert_eq!(seq[12], 1937268448);
}

#[test]
fn mt19937_u32_outputs_match_torch_across_state_regenerations() {
    for entry in fixture("mt19937.json")["seeds"].as_array().unwrap() {
        let seed = entry["seed"].as_u64().unwrap();
        let picks = u64s(&entry["u32_low31_index"]);
        let expected = u64s(&entry["u32_low31"]);
        let mut rng = Mt19937::new(seed);
        let outputs: Vec<u32> = (0..=*picks.last().unwrap())
            .map(|_| rng.next_u32())
            .collect();
        for (&i, &want) in picks.iter().zip(&expected) {
            // torch's int32 random_() keeps the low 31 bits of one 32-bit draw.
            assert_eq!(
                u64::from(outputs[i as usize] & 0x7fff_ffff),
                want,
                "seed {seed}, draw {i}"
            );
        }
    }
}

#[test]
fn mt19937_next_u64_puts_the_first_draw_in_the_high_half_like_torch_random64() {
    for entry in fixture("mt19937.json")["seeds"].as_array().unwrap() {
        let seed = entry["seed"].as_u64().unwrap();
        let mut rng = Mt19937::new(seed);
        // torch's int64 random_() is random64() modulo 2^63.
        let ours: Vec<u64> = (0..4).map(|_| rng.next_u64() % (1 << 63)).collect();
        assert_eq!(ours, u64s(&entry["u64_mod_2p63_first4"]), "seed {seed}");
    }
}

#[test]
fn mt19937_float_uniform_is_the_low_24_bits_of_one_draw() {
    for entry in fixture("mt19937.json")["seeds"].as_array().unwrap() {
        let seed = entry["seed"].as_u64().unwrap();
        let mut rng = Mt19937::new(seed);
        let ours: Vec<u32> = (0..8)
            .map(|_| ((rng.next_u32() & 0xff_ffff) as f32 / 16_777_216.0).to_bits())
            .collect();
        assert_eq!(ours, u32s(&entry["rand_f32_bits_first8"]), "seed {seed}");
    }
}

#[test]
fn mt19937_uses_only_the_low_32_bits_of_the_seed() {
    let mut a = Mt19937::new(5);
    let mut b = Mt19937::new((1 << 32) + 5);
    assert_eq!(a.next_u64(), b.next_u64());
}

#[test]
fn portable_kernel_is_bit_for_bit_torch_default_capability() {
    let golden = fixture("randn_portable.json");
    let mut elements = 0;
    for case in golden["cases"].as_array().unwrap() {
        let c = compare_case(case, RandnKernel::Portable);
        let label = format!("seed {} shape {:?}", case["seed"], shape_of(case));
        for (k, (ours, theirs)) in c.pairs.iter().enumerate() {
            assert_eq!(
                ours,
                theirs,
                "{label}, stored element {k}: ours {} torch {}",
                f32::from_bits(*ours),
                f32::from_bits(*theirs)
            );
        }
        if let Some(equal) = c.hash_equal {
            assert!(equal, "{label}: SHA-256 of the whole tensor differs");
        }
        elements += c.pairs.len();
    }
    eprintln!("portable: {elements} stored elements bit for bit, all whole-tensor hashes equal");
}

#[test]
fn vectorized_kernel_is_within_one_ulp_of_torch_avx2_capability() {
    let golden = fixture("randn_vectorized.json");
    let (mut exact, mut total, mut max_ulps) = (0usize, 0usize, 0u64);
    let (mut hashes_equal, mut hashes) = (0usize, 0usize);
    for case in golden["cases"].as_array().unwrap() {
        let c = compare_case(case, RandnKernel::Vectorized);
        let label = format!("seed {} shape {:?}", case["seed"], shape_of(case));
        for (k, &(ours, theirs)) in c.pairs.iter().enumerate() {
            let d = ulps(ours, theirs);
            assert!(
                d <= 1,
                "{label}, stored element {k}: {d} ulps (ours {} torch {})",
                f32::from_bits(ours),
                f32::from_bits(theirs)
            );
            max_ulps = max_ulps.max(d);
            exact += usize::from(d == 0);
            total += 1;
        }
        if let Some(equal) = c.hash_equal {
            hashes += 1;
            hashes_equal += usize::from(equal);
        }
        if let Some(err) = c.sum_error {
            assert!(err < 1e-3, "{label}: float64 sum off by {err}");
        }
    }
    eprintln!(
        "vectorized: {exact}/{total} stored elements bit exact ({:.4}%), max {max_ulps} ulp; \
         {hashes_equal}/{hashes} whole-tensor hashes equal",
        100.0 * exact as f64 / total as f64
    );
}

#[test]
fn vectorized_kernel_is_bit_for_bit_torch_avx2_capability() {
    // The emulation fuses exactly the multiply-adds that the shipped binary fuses, so beyond the
    // 1-ulp contract it is in fact exact; this pins that down.
    let golden = fixture("randn_vectorized.json");
    for case in golden["cases"].as_array().unwrap() {
        let c = compare_case(case, RandnKernel::Vectorized);
        let label = format!("seed {} shape {:?}", case["seed"], shape_of(case));
        let differing = c.pairs.iter().filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{label}: {differing} stored elements differ");
        if let Some(equal) = c.hash_equal {
            assert!(equal, "{label}: SHA-256 of the whole tensor differs");
        }
    }
}

#[test]
fn seed_1234_matches_the_golden_values_of_torch_randn_md() {
    let portable = torch_randn(1234, &[64], RandnKernel::Portable).data;
    let vectorized = torch_randn(1234, &[64], RandnKernel::Vectorized).data;
    let first3 = [
        -0.1117185652256012,
        -0.49659010767936707,
        0.16307370364665985,
    ];
    for (k, want) in first3.iter().enumerate() {
        assert_eq!(f64::from(portable[k]), *want);
        assert_eq!(f64::from(vectorized[k]), *want);
    }
    assert_eq!(f64::from(vectorized[3]), -0.8816877603530884);
    assert_eq!(f64::from(portable[3]), -0.8816878199577332);
}

#[test]
fn fewer_than_16_elements_use_the_same_serial_path_for_both_kernels() {
    for n in 1..16 {
        assert_eq!(
            torch_randn(42, &[n], RandnKernel::Portable),
            torch_randn(42, &[n], RandnKernel::Vectorized),
            "n = {n}"
        );
    }
}

#[test]
fn the_serial_path_caches_the_second_value_of_each_pair() {
    // Element 1 is the cached sine half of the pair that produced element 0, so a 1-element
    // tensor is the first element of a 2-element one and draws the same generator state.
    let one = torch_randn(3, &[1], RandnKernel::default()).data;
    let two = torch_randn(3, &[2], RandnKernel::default()).data;
    let three = torch_randn(3, &[3], RandnKernel::default()).data;
    assert_eq!(one[0], two[0]);
    assert_eq!(two[..], three[..2]);
    assert_ne!(two[0], two[1]);
}

#[test]
fn same_seed_gives_the_same_noise() {
    let a = torch_randn(77, &[1, 4, 8, 8], RandnKernel::Vectorized);
    let b = torch_randn(77, &[1, 4, 8, 8], RandnKernel::Vectorized);
    assert_eq!(a, b);
}

#[test]
fn different_seeds_give_different_noise() {
    let a = torch_randn(77, &[1, 4, 8, 8], RandnKernel::Vectorized);
    let b = torch_randn(78, &[1, 4, 8, 8], RandnKernel::Vectorized);
    let same = a.data.iter().zip(&b.data).filter(|(x, y)| x == y).count();
    assert_eq!(same, 0);
}

#[test]
fn seeds_equal_modulo_2_pow_32_give_the_same_noise_as_in_torch() {
    let a = torch_randn(5, &[40], RandnKernel::Vectorized);
    let b = torch_randn((1 << 32) + 5, &[40], RandnKernel::Vectorized);
    assert_eq!(a, b);
}

#[test]
fn noise_keeps_the_shape_and_has_one_value_per_element() {
    let n = torch_randn(0, &[1, 4, 5, 7], RandnKernel::Portable);
    assert_eq!(n.shape, vec![1, 4, 5, 7]);
    assert_eq!(n.data.len(), 140);
    assert_eq!(torch_randn(0, &[], RandnKernel::Portable).data.len(), 1);
    assert!(torch_randn(0, &[3, 0], RandnKernel::Portable)
        .data
        .is_empty());
}

#[test]
fn noise_is_roughly_standard_normal() {
    let n = torch_randn(9, &[1, 4, 64, 64], RandnKernel::Vectorized).data;
    let mean = n.iter().map(|&x| f64::from(x)).sum::<f64>() / n.len() as f64;
    let var = n
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n.len() as f64;
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((var - 1.0).abs() < 0.05, "variance {var}");
}

#[test]
fn randn_kernel_defaults_to_vectorized() {
    assert_eq!(RandnKernel::default(), RandnKernel::Vectorized);
}

#[test]
fn randn_kernel_parses_its_names_and_rejects_others() {
    assert_eq!(
        "portable".parse::<RandnKernel>().unwrap(),
        RandnKernel::Portable
    );
    assert_eq!(
        "vectorized".parse::<RandnKernel>().unwrap(),
        RandnKernel::Vectorized
    );
    for k in [RandnKernel::Portable, RandnKernel::Vectorized] {
        assert_eq!(k.to_string().parse::<RandnKernel>().unwrap(), k);
    }
    let err = "avx2".parse::<RandnKernel>().unwrap_err();
    assert!(err.to_string().contains("\"avx2\""), "{err}");
}

#[test]
fn a_flux_sized_latent_is_generated_in_well_under_a_second() {
    // Typically a few milliseconds; the bound only catches pathological slowdowns.
    for kernel in [RandnKernel::Portable, RandnKernel::Vectorized] {
        let start = std::time::Instant::now();
        let noise = torch_randn(42, &[1, 16, 128, 128], kernel);
        let elapsed = start.elapsed();
        assert_eq!(noise.data.len(), 262_144);
        assert!(elapsed.as_millis() < 500, "{kernel}: {elapsed:?}");
    }
}
