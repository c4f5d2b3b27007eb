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

/// COCO's mAP@[.5:.95] and mAP@0.5 equal pycocotools' COCOeval on the same boxes, to 1e-4: 40
/// images, 4 classes, detections jittered from the truth at several strengths, duplicates, false
/// positives, tied scores, images with no truth and classes with no detection.
#[test]
fn mean_ap_equals_pycocotools() {
    use ringtrain::detect::{mean_ap, ImageBoxes};
    let Some(py) = python_with_torch("mean_ap_equals_pycocotools") else { return };
    let mut x = 7u64;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 40) as f64 / (1u64 << 24) as f64
    };
    let (mut dets, mut truths, mut json) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..40 {
        let (mut t, mut d) = (ImageBoxes::default(), ImageBoxes::default());
        let n = if i % 9 == 0 { 0 } else { 1 + (next() * 5.0) as usize };
        for _ in 0..n {
            let (x1, y1) = (next() * 90.0, next() * 90.0);
            let b = [x1, y1, x1 + 8.0 + next() * 30.0, y1 + 8.0 + next() * 30.0];
            let class = (next() * 3.0) as i64; // class 3 never has truth
            t.boxes.push(b);
            t.classes.push(class);
            // Found with jitter (IoU anywhere from ~0.3 to 1), sometimes twice, sometimes missed.
            for _ in 0..(next() * 2.6) as usize {
                let j = next() * 8.0;
                let jb = [b[0] + (next() - 0.5) * j, b[1] + (next() - 0.5) * j, b[2] + (next() - 0.5) * j, b[3] + (next() - 0.5) * j];
                d.boxes.push(jb);
                d.classes.push(if next() < 0.1 { (class + 1) % 4 } else { class });
                d.scores.push((next() * 20.0).floor() / 20.0); // ties
            }
        }
        for _ in 0..(next() * 3.0) as usize {
            let (x1, y1) = (next() * 90.0, next() * 90.0);
            d.boxes.push([x1, y1, x1 + 10.0, y1 + 12.0]);
            d.classes.push((next() * 4.0) as i64);
            d.scores.push((next() * 20.0).floor() / 20.0);
        }
        let gts: Vec<Vec<f64>> = t.boxes.iter().zip(&t.classes).map(|(b, &c)| vec![b[0], b[1], b[2], b[3], c as f64]).collect();
        let ds: Vec<Vec<f64>> =
            d.boxes.iter().zip(&d.classes).zip(&d.scores).map(|((b, &c), &s)| vec![b[0], b[1], b[2], b[3], s, c as f64]).collect();
        json.push(serde_json::json!({"gts": gts, "dets": ds}));
        truths.push(t);
        dets.push(d);
    }
    let ours = mean_ap(&dets, &truths).expect("there is truth");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("boxes.json");
    std::fs::write(&input, serde_json::to_vec(&json).unwrap()).unwrap();
    let mut c = Command::new(&py);
    c.arg(script("reference/coco_map.py")).arg(&input);
    let out = run(c, std::time::Duration::from_secs(120));
    out.assert_success();
    let theirs: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let (map, map50) = (theirs["map"].as_f64().unwrap(), theirs["map50"].as_f64().unwrap());
    eprintln!("mAP@[.5:.95] ours {:.6} pycocotools {map:.6}; mAP@0.5 ours {:.6} pycocotools {map50:.6}", ours.map, ours.map50);
    assert!(map > 0.1 && map < 0.9 && map50 > map, "a case that tests something: {map} {map50}");
    assert!((ours.map - map).abs() <= 1e-4, "mAP@[.5:.95]: ours {} pycocotools {map}", ours.map);
    assert!((ours.map50 - map50).abs() <= 1e-4, "mAP@0.5: ours {} pycocotools {map50}", ours.map50);
}

/// mAP over every rank's shard of the test images equals mAP of one process holding them all, at
/// 1–4 ranks, with ranks that hold no image (3 images at 4 ranks) and images without boxes.
#[test]
fn distributed_mean_ap_is_the_whole_sets_at_any_world_size() {
    use ringtrain::detect::{distributed_mean_ap, mean_ap, ImageBoxes};
    // Values on a 1/8 grid: exact in the f32 rows the gather carries.
    fn image(i: usize) -> (ImageBoxes, ImageBoxes) {
        let (mut t, mut d) = (ImageBoxes::default(), ImageBoxes::default());
        for k in 0..(i * 7 + 3) % 4 {
            let (x, y) = (((i * 13 + k * 29) % 80) as f64, ((i * 31 + k * 17) % 80) as f64);
            t.boxes.push([x, y, x + 12.0, y + 10.0]);
            t.classes.push(((i + k) % 3) as i64);
            if !(i + k).is_multiple_of(5) {
                let j = ((i + 2 * k) % 7) as f64 * 0.625;
                d.boxes.push([x + j, y - j, x + 12.0 + j, y + 10.0]);
                d.classes.push(((i + k) % 3) as i64);
                d.scores.push(((i * 3 + k * 5) % 16) as f64 / 16.0);
            }
        }
        if i % 4 == 1 {
            d.boxes.push([1.0, 2.0, 9.0, 9.5]);
            d.classes.push((i % 3) as i64);
            d.scores.push(0.5);
        }
        (d, t)
    }
    for n in [3usize, 20] {
        let (dets, truths): (Vec<ImageBoxes>, Vec<ImageBoxes>) = (0..n).map(image).unzip();
        let want = mean_ap(&dets, &truths).expect("there is truth");
        for world in 1..=4usize {
            let got = with_group_over(world, std::time::Duration::from_secs(20), false, move |rank, comm| {
                let mine: Vec<usize> = (0..n).filter(|i| i % world == rank).collect();
                let d = mine.iter().map(|&i| (i, image(i).0)).collect();
                let t = mine.iter().map(|&i| (i, image(i).1)).collect();
                distributed_mean_ap(&mut *comm.lock(), &mine, &d, &t).unwrap().expect("there is truth")
            });
            for (rank, m) in got.iter().enumerate() {
                assert_eq!(*m, want, "{n} images, world {world}, rank {rank}");
            }
        }
        assert!(want.map50 > 0.2 && want.map50 < 1.0, "a case that tests something: {want:?}");
    }
}
