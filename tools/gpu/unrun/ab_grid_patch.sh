#!/usr/bin/env bash
# One GPU call for grid_tables_shared_signs_bounds.patch (kernels_notes.md, its last paragraphs): this tree
# as the base (A), this tree with the patch applied as B, through tools/gpu/ab_build.sh: B's CUDA tests and
# compute-sanitizer, the one-row and staged kernels of the types it touches under both builds, decoding.
# The patch is applied to the machine's copy of the tree only. Usage, from the repository root (carry .whl):
#   OUT=$OUT/k bash tools/gpu/unrun/ab_grid_patch.sh
set -uo pipefail
cd "$(dirname "$0")/../../.."
patch_file=tools/gpu/unrun/grid_tables_shared_signs_bounds.patch
base_dir=.carry/base_grid_patch
rm -rf "$base_dir"
for f in $(sed -n 's|^+++ b/||p' "$patch_file"); do
  mkdir -p "$base_dir/$(dirname "$f")"
  cp "$f" "$base_dir/$f"
done
if ! git apply "$patch_file" 2>/dev/null && ! patch -p1 --forward < "$patch_file"; then
  echo "the patch did not apply"
  exit 1
fi
grid=IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S
lowbit=TQ1_0,TQ2_0,Q1_0,Q2_0
export BASE_DIR=$base_dir DECODE_TYPES="IQ2_XXS TQ2_0"
export SETS="1:forward:gemv:$grid,$lowbit,NVFP4 16:forward:staged:$lowbit,IQ2_XXS,IQ2_XS,IQ3_XXS
1:input_grad:gemv,staged:$grid,$lowbit"
export SAN_K="gemv and (IQ1_S or IQ1_M or IQ2_XXS or IQ2_S or IQ3_XXS or IQ3_S or TQ1_0 or Q2_0)"
bash tools/gpu/ab_build.sh
