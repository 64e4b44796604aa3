# Sourced by tools/pretrain.sh and tools/pretrain_mm.sh: NPROC_PER_NODE and NNODES as counts from 1, NODE_RANK as a
# node's number below NNODES (decimal, leading zeros allowed, as torchrun reads them), or one line and exit 2.
# Not torchrun's auto/gpu: each script checks the inputs for the number of processes it starts, so it must know
# that number. Sets nproc and nnodes.
_launch_refuse() {
  echo "$(basename "$0"): error: $1 is invalid; set it to $2" >&2
  exit 2
}
for _var in NPROC_PER_NODE NNODES NODE_RANK; do
  _val=${!_var:-}
  [ -n "$_val" ] || continue
  case $_val in
    *[!0-9]*) _launch_refuse "$_var=$_val" "a whole number, 0 or more (torchrun's auto and gpu are not read here)" ;;
  esac
done
nproc=$((10#${NPROC_PER_NODE:-1}))
nnodes=$((10#${NNODES:-1}))
_rank=$((10#${NODE_RANK:-0}))
[ "$nproc" -ge 1 ] || _launch_refuse "NPROC_PER_NODE=$NPROC_PER_NODE" "a count of 1 or more, e.g. NPROC_PER_NODE=8"
[ "$nnodes" -ge 1 ] || _launch_refuse "NNODES=$NNODES" "a count of 1 or more, e.g. NNODES=2"
[ "$_rank" -lt "$nnodes" ] || _launch_refuse "NODE_RANK=$NODE_RANK" "this node's number, 0 to NNODES-1 ($((nnodes - 1)))"
