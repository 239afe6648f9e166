"""A backport to older jax's Mosaic GPU that the cluster kernels need to lower there.

jax 0.11 (0.11.2 is what the lent GPU image has) maps a shared-memory ref to a peer CTA of the
cluster (`plgpu.cluster_ref`, lowered by `mosaic.gpu.utils.get_cluster_ref`) with the ref's
offset folded into the pointer and a zero offset in the result's type, while its dialect
lowering expects the source's layout (`offset: ?` for a slice): loading a slice of a peer's
buffer, as every exchange of the cluster kernels does, fails to lower with "Expected type
memref<..., offset: ?, 7 : i32> for value ...". Measured with compile-only H100s: every cluster
kernel on 4 and on 8 CTAs fails so on jax 0.11.2, and lowers on 0.12.0.1, whose
`get_cluster_ref` maps the aligned pointer and keeps the offset (and sizes, strides) in the
descriptor. `apply()` installs that function where jax's still lacks it (no
`to_memref_descriptor` in `mosaic.gpu.utils`: before 0.12); on newer jax it does nothing.
"""
from __future__ import annotations

import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, builtin, gpu, llvm


def _descriptor_type(memref_ty: ir.MemRefType) -> ir.Type:
  """MLIR's LLVM struct for a memref: allocated and aligned pointers, offset, sizes, strides."""
  i64 = ir.IntegerType.get_signless(64)
  ptr = llvm.PointerType.get(utils.get_memref_llvm_address_space(memref_ty) or 0)
  fields = [ptr, ptr, i64] + [llvm.ArrayType.get(i64, memref_ty.rank)] * 2 * (memref_ty.rank > 0)
  return llvm.StructType.get_literal(fields)


def get_cluster_ref(ref: ir.Value, dim: gpu.Dimension, idx: ir.Value, generic: bool = True):
  """The peer CTA `idx` (along cluster dimension `dim`)'s copy of shared-memory `ref`, with the
  same layout (jax 0.12's `mosaic.gpu.utils.get_cluster_ref`)."""
  i32 = ir.IntegerType.get_signless(32)
  ref_ty = ir.MemRefType(ref.type)
  if not utils.is_smem_ref(ref_ty):
    raise ValueError(f"Expected SMEM but got: {ref_ty.memory_space}")
  result_ty = ir.MemRefType.get(ref_ty.shape, ref_ty.element_type, ref_ty.layout,
                                None if generic else ir.IntegerAttr.get(i32, 7))
  idxs = [gpu.cluster_block_id(d) for d in gpu.Dimension]
  idxs[dim] = idx
  block = arith.index_cast(i32, utils.cluster_idx(dim_idx=idxs))
  desc = builtin.unrealized_conversion_cast([_descriptor_type(ref_ty)], [ref])
  aligned = llvm.ExtractValueOp(llvm.PointerType.get(utils.WORKGROUP_NVPTX_ADDRESS_SPACE), desc,
                                [1]).result
  mapped = utils.get_cluster_ptr(aligned, block, generic)
  out = llvm.UndefOp(_descriptor_type(result_ty)).result
  out = llvm.InsertValueOp(out, mapped, [0]).result
  out = llvm.InsertValueOp(out, mapped, [1]).result
  # The offset, sizes and strides as they were: the mapped pointer is the aligned base's.
  fields = [(2, ir.IntegerType.get_signless(64))]
  if ref_ty.rank:
    array = llvm.ArrayType.get(ir.IntegerType.get_signless(64), ref_ty.rank)
    fields += [(3, array), (4, array)]
  for i, ty in fields:
    out = llvm.InsertValueOp(out, llvm.ExtractValueOp(ty, desc, [i]).result, [i]).result
  return builtin.unrealized_conversion_cast([result_ty], [out])


def apply() -> bool:
  """Installs `get_cluster_ref` where jax's drops the offset; whether it did."""
  if hasattr(utils, "to_memref_descriptor") or utils.get_cluster_ref is get_cluster_ref:
    return False
  utils.get_cluster_ref = get_cluster_ref
  mgpu.get_cluster_ref = get_cluster_ref
  return True
