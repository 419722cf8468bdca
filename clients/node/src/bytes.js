// Big-endian uint32 reads and writes by hand, for the hot paths: on Node 20
// a Buffer method called from optimized code (buf.readUInt32BE(...)) is
// looked up through V8's generic LoadIC every time (~10 ns, a measured 6% of
// the client's samples through quotad), where indexed bytes are inlined.

/** buf[pos, pos + 4) as a big-endian uint32 (the caller checked the bounds). */
export function readU32(buf, pos) {
  return buf[pos] * 0x1000000 + ((buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]);
}

/** Writes uint32 `n` big-endian at buf[pos, pos + 4) (the caller reserved the room). */
export function writeU32(buf, pos, n) {
  buf[pos] = n >>> 24;
  buf[pos + 1] = n >>> 16;
  buf[pos + 2] = n >>> 8;
  buf[pos + 3] = n;
}
