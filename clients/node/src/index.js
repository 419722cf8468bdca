export { Client } from './client.js';
export { Decision, Lookup, RuleUsage } from './models.js';
export { defaultSocketPath } from './path.js';
export { encodeFrame, decodeBody, FrameReader } from './codec.js';
export * from './errors.js';
