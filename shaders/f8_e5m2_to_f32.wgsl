// f8_e5m2_to_f32.wgsl: F8_E5M2 (OCP: the upper byte of an IEEE half, with infinities and
// NaNs) -> F32, exact, NaNs quieted as the `half` crate quiets F16 NaNs.
// Bindings and Params: common.wgsl (prepended).
// Layout: src word i holds elements 4i .. 4i+3, lowest byte first; dst word k is element k.
// Unit: one src word -> up to four dst words (those inside `elements`).
// Dispatch: ceil(units / 64) workgroups of 64 along x.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    let w = src[i];
    for (var k = 0u; k < 4u; k += 1u) {
        if (4u * i + k < params.elements) {
            dst[4u * i + k] = f16_bits_to_f32_bits(((w >> (8u * k)) & 0xFFu) << 8u);
        }
    }
}
