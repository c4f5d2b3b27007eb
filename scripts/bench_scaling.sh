#!/usr/bin/env bash
# The α-β scaling model (scripts/scaling_model.py) against emulated nodes, in one invocation:
# α and β of the cross-node link (2 nodes × 1 rank, links limited to RT_LINK_RATE, default
# 500mbit) and of the node-local one (shared memory, 2 ranks) are fitted from two message sizes;
# the model then predicts the flat and hierarchical all-reduce of SIZE bytes (default 8M) on 2 × 2,
# 4 × 1 and 4 × 2 emulated nodes, which are measured beside it; then the predicted curve for
# GPT-2 XL on H100 nodes from published link figures. Needs root.
#   scripts/bench_scaling.sh [SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-8M}"
cargo build --release --quiet
bin="$PWD/target/release"
export RT_NETNS_ID="${RT_NETNS_ID:-43}"
export RT_LINK_RATE="${RT_LINK_RATE:-500mbit}"
bytes() { numfmt --from=iec "$1"; }

# Mean all-reduce time in seconds for one size from ringbench's table (rank 0's row).
time_of() { awk -v s="$(bytes "$2")" '$1 == s { print $5 / 1e6 }' <<<"$1"; }

# ringbench on N emulated nodes × G ranks; extra ringbench flags after.
on_nodes() {
    local n="$1" g="$2" sizes="$3"; shift 3
    scripts/netns_nodes.sh run "$n" bash -c "'$bin/ringrun' --nnodes $n --node-rank \$NODE_RANK --nproc-per-node $g \
        --master-addr \$MASTER_ADDR --master-port 29720 ringbench allreduce --backend ring --iters 3 $* --sizes $sizes 2>/dev/null \
        | sed 's/^\[rank0\] //'"
}

small=4K; large=8M
cross=$(on_nodes 2 1 "$small,$large")
local_=$("$bin/ringrun" --nproc-per-node 2 ringbench allreduce --backend ring --local-transport shm --sizes "$small,$large" 2>/dev/null | sed 's/^\[rank0\] //')
read -r ax bx < <(python3 scripts/scaling_model.py fit "$(time_of "$cross" $small)" "$(bytes $small)" "$(time_of "$cross" $large)" "$(bytes $large)")
read -r al bl < <(python3 scripts/scaling_model.py fit "$(time_of "$local_" $small)" "$(bytes $small)" "$(time_of "$local_" $large)" "$(bytes $large)")
echo "# links: cross-node ($RT_LINK_RATE) α = $(python3 -c "print(f'{$ax*1e6:.0f} µs, 1/β = {1/$bx/1e6:.1f} MB/s')"); node-local (shm) α = $(python3 -c "print(f'{$al*1e6:.0f} µs, 1/β = {1/$bl/1e9:.2f} GB/s')")"
printf "%-8s %-13s %12s %12s %8s\n" layout all-reduce "predicted ms" "measured ms" error
for layout in "2 2" "4 1" "4 2"; do
    read -r n g <<<"$layout"
    read -r pf ph < <(python3 scripts/scaling_model.py predict "$ax" "$bx" "$al" "$bl" "$n" "$g" "$(bytes "$size")")
    for mode in flat hierarchical; do
        [ "$g" = 1 ] && [ $mode = hierarchical ] && continue
        flag=$( [ $mode = hierarchical ] && echo --hierarchical || true )
        measured=$(time_of "$(on_nodes "$n" "$g" "$size" $flag)" "$size")
        predicted=$( [ $mode = flat ] && echo "$pf" || echo "$ph" )
        python3 -c "p, m = $predicted, $measured; print(f'{\"$n × $g\":<8} {\"$mode\":<13} {p*1e3:>12.1f} {m*1e3:>12.1f} {(p-m)/m:>+8.0%}')"
    done
done
echo
python3 scripts/scaling_model.py curve
