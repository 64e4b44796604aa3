# Sourced by tools/pretrain.sh and tools/pretrain_mm.sh: NPROC_PER_NODE, NNODES and NODE_RANK as whole numbers
# (counts from 1, the node's number from 0), or one line and exit 2. Not torchrun's auto/gpu: each script checks
# the inputs for the number of processes it will start, so it must know that number. Sets nproc and nnodes.
nproc=${NPROC_PER_NODE:-1}
nnodes=${NNODES:-1}
for var in NPROC_PER_NODE="$nproc" NNODES="$nnodes" NODE_RANK="${NODE_RANK:-0}"; do
  case ${var#*=} in
    '' | *[!0-9]* | 0 | 0[0-9]*)
      [ "$var" = NODE_RANK=0 ] && continue
      what="a count of 1 or more (e.g. ${var%%=*}=2; torchrun's auto and gpu are not read here)"
      [ "${var%%=*}" = NODE_RANK ] && what="this node's number, 0 to NNODES-1"
      echo "$(basename "$0"): error: $var is invalid; set it to $what" >&2
      exit 2 ;;
  esac
done
