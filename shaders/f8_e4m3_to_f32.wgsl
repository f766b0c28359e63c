// f8_e4m3_to_f32.wgsl: F8_E4M3 (OCP E4M3FN: bias 7, no infinities, S.1111.111 is NaN) -> F32,
// exact. Bindings and Params: common.wgsl (prepended).
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
            dst[4u * i + k] = f8_e4m3_bits_to_f32_bits((w >> (8u * k)) & 0xFFu);
        }
    }
}
