#!/usr/bin/env bash
# bench-compare.sh BASE: times the current tree against commit BASE on the same
# work and prints current/baseline ratios (`make bench-compare BASE=<commit>`).
#
# The baseline is built once, with its own native library, in a git worktree
# under .bench/base-<sha>/ that is kept for the next run. Both binaries run
# `stepwise bench --json` with the same $BENCH_ARGS, one dtype per process and
# the baseline first, and the current binary's `bench compare` prints the
# ratios. Both outputs stay under .bench/run-<time>/. With ROUNDS=N the pair
# runs N times, the order swapped every round (baseline first, then current
# first), and the ratios are of each side's medians.
#
# Environment:
#   BENCH_ARGS    bench flags for both runs, split on spaces (no quoting). Use
#                 only flags the baseline's bench knows too: 201b204's knows
#                 --model --tokenizer --cache --sizes --dtypes --steps
#                 --cfg-scale --preview --threads --device -v.
#   CURRENT_LIB   an already built libstepwise.so for the current tree: then
#                 only its Go binary is built (`make bin`), not `make build`.
#   ROUNDS        how many times to run each pair (default 1): on a shared,
#                 noisy machine 3 or more, interleaved, before trusting a
#                 ratio near a mark.
#   GO, JOBS      the go command and the native build's parallelism.
set -euo pipefail

say() { printf 'bench-compare: %s\n' "$*" >&2; }

base=${1:-}
if [ -z "$base" ]; then
	say "usage: scripts/bench-compare.sh BASE (a commit; BENCH_ARGS for bench's flags)"
	exit 2
fi
root=$(git rev-parse --show-toplevel)
cd "$root"
GO=${GO:-$(command -v go 2>/dev/null || echo /usr/local/go/bin/go)}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
ROUNDS=${ROUNDS:-1}
case $ROUNDS in
'' | *[!0-9]* | 0*)
	say "ROUNDS must be a positive number, not '$ROUNDS'"
	exit 2
	;;
esac

sha=$(git rev-parse --verify --quiet "$base^{commit}") || { say "$base is not a commit"; exit 2; }
short=$(git rev-parse --short=7 "$sha")
basedir=$root/.bench/base-$short
base_bin=$basedir/build/stepwise
base_lib=$basedir/build/libstepwise.so

# --dtypes is split into one run per dtype; --json and --lib are ours to set.
read -r -a words <<<"${BENCH_ARGS:-}"
dtypes=f32 # both benches' default
args=()
for ((i = 0; i < ${#words[@]}; i++)); do
	w=${words[i]}
	case $w in
	--dtypes | -dtypes)
		i=$((i + 1))
		dtypes=${words[i]:-}
		;;
	--dtypes=* | -dtypes=*) dtypes=${w#*=} ;;
	--json | -json | --json=* | -json=*) ;;
	--lib | -lib) i=$((i + 1)) ;;
	--lib=* | -lib=*) ;;
	*) args+=("$w") ;;
	esac
done
if [ -z "$dtypes" ]; then
	say "--dtypes needs a value"
	exit 2
fi

# The baseline, built once.
if [ ! -e "$basedir/.git" ]; then
	say "checking out $short in $basedir"
	mkdir -p "$root/.bench"
	git worktree add --detach "$basedir" "$sha" >&2
fi
if [ ! -f "$base_lib" ] || [ ! -x "$base_bin" ]; then
	say "building the baseline $short (once)"
	cmake -S "$basedir" -B "$basedir/build" -DCMAKE_BUILD_TYPE=Release >&2
	cmake --build "$basedir/build" --target stepwise -j "$JOBS" >&2
	(cd "$basedir" && CGO_ENABLED=0 "$GO" build -trimpath -o build/stepwise ./cmd/stepwise) >&2
else
	say "baseline $short already built in $basedir"
fi

# The current tree.
cur_bin=$root/build/stepwise
if [ -n "${CURRENT_LIB:-}" ]; then
	cur_lib=$(realpath "$CURRENT_LIB")
	make --no-print-directory bin >&2
else
	cur_lib=$root/build/libstepwise.so
	make --no-print-directory build >&2
fi

run=$root/.bench/run-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run"
: >"$run/base.json"
: >"$run/current.json"
IFS=, read -r -a dtype_list <<<"$dtypes"
# bench_one ROUND DTYPE WHO BIN LIB OUT: one side's bench of one dtype.
bench_one() {
	say "round $1/$ROUNDS, $3, $2: $4 bench ${args[*]} --dtypes $2 --json"
	"$4" bench "${args[@]}" --dtypes "$2" --json --lib "$5" >>"$6"
}
for ((round = 1; round <= ROUNDS; round++)); do
	for dt in "${dtype_list[@]}"; do
		base_side=("baseline $short" "$base_bin" "$base_lib" "$run/base.json")
		cur_side=(current "$cur_bin" "$cur_lib" "$run/current.json")
		if ((round % 2 == 1)); then
			bench_one "$round" "$dt" "${base_side[@]}"
			bench_one "$round" "$dt" "${cur_side[@]}"
		else
			bench_one "$round" "$dt" "${cur_side[@]}"
			bench_one "$round" "$dt" "${base_side[@]}"
		fi
	done
done
say "outputs in $run"
echo "current ($(git rev-parse --short=7 HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ', modified')) against baseline $short:"
"$cur_bin" bench compare "$run/base.json" "$run/current.json"
