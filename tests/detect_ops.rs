//! Detection operations against torchvision's on the same inputs (the test venv's).

mod common;
use common::*;
use ringtrain::detect::{batched_nms, nms};
use std::process::Command;
use tch::Tensor;

/// Boxes in clusters (so that suppression happens at every threshold), scores with ties, 3
/// classes; deterministic.
fn cases(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let (mut boxes, mut scores, mut classes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (cx, cy) = (((i % 3) * 40) as f32 + next() * 12.0, ((i % 2) * 40) as f32 + next() * 12.0);
        let (w, h) = (8.0 + next() * 30.0, 8.0 + next() * 30.0);
        boxes.extend([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]);
        // Scores on a grid of 1/64: ties between boxes, which must fall in index order.
        scores.push((next() * 64.0).floor() / 64.0);
        classes.push((next() * 3.0) as i64);
    }
    (boxes, scores, classes)
}

#[test]
fn nms_and_batched_nms_keep_what_torchvision_keeps() {
    let Some(py) = python_with_torch_and("nms_and_batched_nms_keep_what_torchvision_keeps", "torchvision") else { return };
    let dir = tempfile::tempdir().unwrap();
    let thresholds = [0.3, 0.5, 0.7];
    let mut mine = Vec::new();
    let mut inputs = Vec::new();
    for (n, seed) in [(1usize, 1u64), (40, 2), (300, 3)] {
        let (b, s, c) = cases(n, seed);
        let (bt, st, ct) = (Tensor::from_slice(&b).view([-1, 4]), Tensor::from_slice(&s), Tensor::from_slice(&c));
        for t in thresholds {
            mine.push(Vec::<i64>::try_from(nms(&bt, &st, t).unwrap()).unwrap());
            mine.push(Vec::<i64>::try_from(batched_nms(&bt, &st, &ct, t).unwrap()).unwrap());
        }
        inputs.push(serde_json::json!({"boxes": b, "scores": s, "classes": c}));
    }
    let input = dir.path().join("cases.json");
    std::fs::write(&input, serde_json::json!({"cases": inputs, "thresholds": thresholds}).to_string()).unwrap();
    let script = r#"
import json, sys, torch, torchvision
from torchvision.ops import boxes as ops
spec = json.load(open(sys.argv[1]))
out = []
for case in spec["cases"]:
    b = torch.tensor(case["boxes"], dtype=torch.float32).view(-1, 4)
    s = torch.tensor(case["scores"], dtype=torch.float32)
    c = torch.tensor(case["classes"], dtype=torch.int64)
    for t in spec["thresholds"]:
        out.append(torchvision.ops.nms(b, s, t).tolist())
        out.append(ops._batched_nms_vanilla(b, s, c, t).tolist())
print(json.dumps(out))
"#;
    let o = Command::new(&py).arg("-c").arg(script).arg(&input).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<Vec<i64>> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(theirs.len(), mine.len());
    for (k, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "case {} threshold {} ({})", k / 6, thresholds[(k / 2) % 3], if k % 2 == 0 { "nms" } else { "batched_nms" });
    }
    // The larger cases suppress at every threshold (else the comparison would be trivial).
    for (k, kept) in mine.iter().enumerate().skip(6) {
        let given = if k < 12 { 40 } else { 300 };
        assert!(kept.len() < given, "case {}: nothing was suppressed", k / 6);
    }
}

/// Predictions of any count per rank (none on some) reach every rank whole and in rank order, at
/// 1–4 ranks over shared memory and TCP; rows of another width are refused on every rank.
#[test]
fn variable_size_rows_gather_from_every_rank_including_empty_ones() {
    for shm in [true, false] {
        for world in 1..=4usize {
            let got = with_group_over(world, std::time::Duration::from_secs(20), shm, move |rank, comm| {
                // Rank r has (r * 2) % 5 rows of 6 values: rank 0 none.
                let n = (rank * 2) % 5;
                let rows = Tensor::arange((n * 6) as i64, tch::kind::FLOAT_CPU).view([n as i64, 6]) + 100.0 * rank as f64;
                let all = ringtrain::comm::all_gather_rows(&mut *comm.lock(), &rows).unwrap();
                all.iter().map(|t| (t.size(), Vec::<f32>::try_from(t.view([-1])).unwrap())).collect::<Vec<_>>()
            });
            for (rank, all) in got.iter().enumerate() {
                assert_eq!(all.len(), world, "shm {shm}, world {world}, rank {rank}");
                for (r, (size, values)) in all.iter().enumerate() {
                    let n = (r * 2) % 5;
                    assert_eq!(size, &vec![n as i64, 6], "shm {shm}, world {world}: rank {rank}'s copy of rank {r}'s rows");
                    let want: Vec<f32> = (0..n * 6).map(|i| i as f32 + 100.0 * r as f32).collect();
                    assert_eq!(values, &want, "shm {shm}, world {world}: rank {rank}'s copy of rank {r}'s rows");
                }
            }
        }
    }
    let errs = with_group_over(2, std::time::Duration::from_secs(20), false, |rank, comm| {
        let rows = Tensor::zeros([1, 5 + rank as i64], tch::kind::FLOAT_CPU);
        ringtrain::comm::all_gather_rows(&mut *comm.lock(), &rows).unwrap_err().to_string()
    });
    assert!(errs[0].contains("rank 1 gathers rows of 6 values, this rank of 5"), "{}", errs[0]);
    assert!(errs[1].contains("rank 0 gathers rows of 5 values, this rank of 6"), "{}", errs[1]);
}
