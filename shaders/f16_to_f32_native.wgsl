// f16_to_f32_native.wgsl: F16 -> F32 through the hardware's f16 type, for adapters with
// SHADER_F16 (the host prepends `enable f16;` before common.wgsl and codec.wgsl). Normal numbers
// take the native conversion, which is exact; zeros, subnormals, infinities and NaNs take the
// bit operations of codec.wgsl, so that no flush-to-zero or NaN canonicalization of a driver can
// change a result: the output equals the CPU reference bit for bit.
// Bindings and Params: common.wgsl.
// Layout: src word i holds elements 2i (low half) and 2i+1 (high half); dst word k is element k.
// Unit: one src word -> two dst words (the second only if it is inside `elements`).
// Dispatch: ceil(units / 64) workgroups of 64 along x.
fn widen(h: u32, native: f32) -> u32 {
    let exp = h & 0x7C00u;
    if (exp == 0u || exp == 0x7C00u) {
        return convert_bits(F16, F32, h, 0u);
    }
    return bitcast<u32>(native);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    let w = src[i];
    let v = vec2<f32>(bitcast<vec2<f16>>(w));
    dst[2u * i] = widen(w & 0xFFFFu, v.x);
    if (2u * i + 1u < params.elements) {
        dst[2u * i + 1u] = widen(w >> 16u, v.y);
    }
}
