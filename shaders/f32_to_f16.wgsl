// f32_to_f16.wgsl: F32 -> F16, rounding to nearest even, NaN payloads kept and quieted, as the
// `half` crate does. Bindings and Params: common.wgsl (prepended).
// Layout: src word k is element k; dst word i holds elements 2i (low half) and 2i+1 (high half).
// Unit: two src words -> one dst word (a missing second element writes zero padding).
// Dispatch: ceil(units / 64) workgroups of 64 along x.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    let lo = f32_bits_to_f16_bits(src[2u * i]);
    var hi = 0u;
    if (2u * i + 1u < params.elements) {
        hi = f32_bits_to_f16_bits(src[2u * i + 1u]);
    }
    dst[i] = lo | (hi << 16u);
}
