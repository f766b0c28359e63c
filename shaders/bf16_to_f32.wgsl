// bf16_to_f32.wgsl: BF16 -> F32, exact (NaNs quieted as the `half` crate does).
// Bindings and Params: common.wgsl (prepended).
// Layout: src word i holds elements 2i (low half) and 2i+1 (high half); dst word k is element k.
// Unit: one src word -> two dst words (the second only if it is inside `elements`).
// Dispatch: ceil(units / 64) workgroups of 64 along x.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    let w = src[i];
    dst[2u * i] = bf16_bits_to_f32_bits(w & 0xFFFFu);
    if (2u * i + 1u < params.elements) {
        dst[2u * i + 1u] = bf16_bits_to_f32_bits(w >> 16u);
    }
}
