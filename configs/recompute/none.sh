# No activation recompute (the planner's choice where every activation fits): drops the --recompute-* flags
# (and their values) that earlier configs (llama7b.sh) set; Megatron has no flag that turns them off again.
kept=()
skip=0
for a in "${ARGS[@]}"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in
    --recompute-granularity|--recompute-method|--recompute-num-layers) skip=1; continue ;;
  esac
  kept+=("$a")
done
ARGS=("${kept[@]}")
