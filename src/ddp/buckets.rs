//! Bucket assignment, as PyTorch's `compute_bucket_assignment_by_size` with the parameter indices
//! given in reverse order (what DDP passes, since the last layers' gradients are ready first):
//! walk the tensors, close a bucket once it reaches the current cap, and move to the next cap
//! (DDP: [1 MiB, 25 MiB]: a small first bucket so communication starts early).

/// `sizes_bytes[i]` is parameter i's gradient size. Returns buckets of parameter indices, in the
/// order they are reduced; every index appears exactly once.
pub fn compute_bucket_assignment_by_size(sizes_bytes: &[usize], caps_bytes: &[usize]) -> Vec<Vec<usize>> {
    assert!(!caps_bytes.is_empty(), "at least one bucket cap");
    let mut buckets = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0usize;
    let mut cap_index = 0;
    for i in (0..sizes_bytes.len()).rev() {
        current.push(i);
        current_bytes += sizes_bytes[i];
        if current_bytes >= caps_bytes[cap_index] {
            buckets.push(std::mem::take(&mut current));
            current_bytes = 0;
            cap_index = (cap_index + 1).min(caps_bytes.len() - 1);
        }
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_order_and_caps() {
        const MIB: usize = 1 << 20;
        // Reference CNN gradients (bytes): conv1 w/b, conv2 w/b, fc1 w/b, fc2 w/b.
        let cnn = [3200, 128, 204800, 256, 1605632, 512, 5120, 40];
        assert_eq!(compute_bucket_assignment_by_size(&cnn, &[MIB, 25 * MIB]), vec![vec![7, 6, 5, 4], vec![3, 2, 1, 0]]);
        // Everything small: one bucket, reversed.
        assert_eq!(compute_bucket_assignment_by_size(&[4, 4, 4], &[MIB]), vec![vec![2, 1, 0]]);
        // Caps advance and then stay at the last one.
        assert_eq!(compute_bucket_assignment_by_size(&[10, 10, 10, 10, 10], &[10, 20]), vec![vec![4], vec![3, 2], vec![1, 0]]);
        assert!(compute_bucket_assignment_by_size(&[], &[MIB]).is_empty());
    }

    #[test]
    fn every_index_exactly_once_over_a_grid() {
        for n in 0..20usize {
            for cap in [1usize, 7, 50, 1000] {
                let sizes: Vec<usize> = (0..n).map(|i| (i * 13) % 17 + 1).collect();
                let b = compute_bucket_assignment_by_size(&sizes, &[cap / 2 + 1, cap]);
                let mut all: Vec<usize> = b.iter().flatten().copied().collect();
                assert!(b.iter().all(|x| !x.is_empty()));
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
