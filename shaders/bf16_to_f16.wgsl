// bf16_to_f16.wgsl: BF16 -> F16 through F32 (exact), then rounding to nearest even.
// Bindings and Params: common.wgsl (prepended).
// Layout: word i of src and of dst holds elements 2i (low half) and 2i+1 (high half).
// Unit: one src word -> one dst word (zero padding converts to zero padding).
// Dispatch: ceil(units / 64) workgroups of 64 along x.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    let w = src[i];
    let lo = f32_bits_to_f16_bits(bf16_bits_to_f32_bits(w & 0xFFFFu));
    let hi = f32_bits_to_f16_bits(bf16_bits_to_f32_bits(w >> 16u));
    dst[i] = lo | (hi << 16u);
}
