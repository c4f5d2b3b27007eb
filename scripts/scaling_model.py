#!/usr/bin/env python3
"""The α-β model of ringtrain's all-reduces, and the step time it predicts.

A ring step moves one chunk over every link at once, so it takes as long as the slowest link:
α (latency) + bytes × β (seconds per byte). With P = N nodes × G ranks and a buffer of M bytes:

  flat ring      2(P-1) steps of M/P bytes; one ring link leaves each node, so the cross-node
                 link sets the pace:  T = 2(P-1) · (α_x + M/P · β_x)
  hierarchical   reduce-scatter and all-gather within the node (2(G-1) steps of M/G over the
                 node-local link), and G rings across nodes, each all-reducing M/G in 2(N-1)
                 steps; the G rings share the node's egress (or use one NIC each):
                 T = 2(G-1) · (α_l + M/G · β_l) + 2(N-1) · (α_x + M/N · β_node)
                 where β_node = 1 / min(G × NIC bandwidth, node egress bandwidth)
  ZeRO-1         reduce-scatter + all-gather: the all-reduce's bytes and steps (same T), the
                 optimizer's work and state divided by P

Subcommands:
  predict ALPHA_X BETA_X ALPHA_L BETA_L N G BYTES     all-reduce times (s), flat and hierarchical
  fit T1 M1 T2 M2                                      α, β from two 2-rank all-reduces (T = 2α + Mβ)
  curve                                                GPT-2 XL on H100 nodes, 8–512 GPUs
"""
import sys


def flat(n, g, m, ax, bx, al=0.0, bl=0.0):
    p = n * g
    if p == 1:
        return 0.0
    if n == 1:
        return 2 * (p - 1) * (al + m / p * bl)
    return 2 * (p - 1) * (ax + m / p * bx)


def hierarchical(n, g, m, ax, bx_node, al, bl):
    local = 2 * (g - 1) * (al + m / g * bl) if g > 1 else 0.0
    cross = 2 * (n - 1) * (ax + m / n * bx_node) if n > 1 else 0.0
    return local + cross


def fit(t1, m1, t2, m2):
    """α and β of a link from two all-reduces between 2 ranks (2 steps of M/2 each: 2α + Mβ)."""
    beta = (t2 - t1) / (m2 - m1)
    # Noise can push the intercept below zero when latency is small next to the transfer.
    alpha = max(0.0, (t1 - m1 * beta) / 2)
    return alpha, beta


def curve():
    # Published figures (per direction):
    #  - NVLink 4 on H100 SXM: 900 GB/s bidirectional per GPU (NVIDIA H100 Tensor Core GPU
    #    datasheet) → 450 GB/s.
    #  - DGX H100: 8 ConnectX-7 adapters at 400 Gb/s (NDR InfiniBand) per node (NVIDIA DGX H100
    #    User Guide) → 50 GB/s per NIC, 400 GB/s per node.
    #  - H100 SXM dense bf16: 989 TFLOP/s (datasheet); 40% MFU assumed.
    # Latencies are assumptions, not published: 5 µs per NVLink ring step, 10 µs per InfiniBand one.
    al, bl = 5e-6, 1 / 450e9
    ax, nic = 10e-6, 50e9
    g = 8
    params = 1.558e9  # GPT-2 XL
    tokens = 8 * 1024  # per GPU per step
    compute = 6 * params * tokens / (0.40 * 989e12)
    grad_bytes = 2 * params  # bf16 gradients, as NCCL with reduce_dtype bf16
    # AdamW on fp32 master weights: read p, g, m, v and write p, m, v (28 bytes/param) at 3.35 TB/s.
    optimizer = params * 28 / 3.35e12
    adam_state_gb = 8 * params / 1e9
    print(f"# GPT-2 XL ({params / 1e9:.2f} B parameters), {tokens} tokens/GPU/step, bf16 gradients ({grad_bytes / 1e9:.1f} GB);")
    print(f"# compute {compute * 1e3:.0f} ms/step at 40% MFU, AdamW {optimizer * 1e3:.1f} ms unsharded; no overlap assumed")
    print(f"{'GPUs':>5} {'nodes':>5} {'flat ms':>9} {'hier ms':>9} {'flat eff':>9} {'hier eff':>9} {'hier+ZeRO-1 eff':>16} {'Adam state GB/GPU (ZeRO-1)':>27}")
    for n in [1, 2, 4, 8, 16, 32, 64]:
        p = n * g
        tf = flat(n, g, grad_bytes, ax, 1 / nic, al, bl)
        th = hierarchical(n, g, grad_bytes, ax, 1 / (g * nic), al, bl) if n > 1 else tf
        step = lambda t, opt: compute + t + opt  # noqa: E731
        print(
            f"{p:>5} {n:>5} {tf * 1e3:>9.1f} {th * 1e3:>9.1f} {compute / step(tf, optimizer):>9.0%} {compute / step(th, optimizer):>9.0%} "
            f"{compute / step(th, optimizer / p):>16.0%} {adam_state_gb:>13.1f} ({adam_state_gb / p:.2f})"
        )


def main(argv):
    if len(argv) >= 1 and argv[0] == "curve":
        curve()
    elif len(argv) == 5 and argv[0] == "fit":
        a, b = fit(*map(float, argv[1:]))
        print(f"{a:.9g} {b:.9g}")
    elif len(argv) == 8 and argv[0] == "predict":
        ax, bx, al, bl = map(float, argv[1:5])
        n, g, m = int(argv[5]), int(argv[6]), float(argv[7])
        # One shared egress per node (emulated nodes): β_node = β_x.
        print(f"{flat(n, g, m, ax, bx, al, bl):.6g} {hierarchical(n, g, m, ax, bx, al, bl):.6g}")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
