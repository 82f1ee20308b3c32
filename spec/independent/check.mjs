#!/usr/bin/env node
// An independent reader, validator and merger of NeuroAda adapter files, written from spec/SPEC.md,
// spec/schema/metadata-v1.schema.json, spec/gguf-names.json and spec/vectors/manifest.json alone,
// to check that the spec is enough to implement the format. Node.js standard library only.
//
//   node spec/independent/check.mjs <vector-dir> [--json]
//
// reads <vector-dir>/manifest.json (SPEC.md section 12), validates every vector, performs every
// merge, prints one line each and exits 1 when anything disagrees with the manifest.
// Section numbers in the comments below are those of SPEC.md.

import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SPEC_DIR = path.resolve(HERE, '..');

// ---------------------------------------------------------------------------------------------
// Errors. A Problem is one finding of a validator (section 7); BaseUnreadable is a base that
// cannot be opened (section 2.6), reported instead of checking the adapter against it.
// ---------------------------------------------------------------------------------------------

class Problem {
  constructor(rule, message, severity = 'error', where = null) {
    Object.assign(this, { rule, message, severity, where });
  }
}

class BaseUnreadable extends Error {
  constructor(rule, message) { super(message); this.rule = rule; }
}

class JsonError extends Error {}

// ---------------------------------------------------------------------------------------------
// Section 11.1 / 2.2 / 3.1: one strict JSON parser with one set of limits for every JSON text.
// Numbers are kept as JNum so that "written without fraction or exponent" can be checked and
// integers stay exact (BigInt) however long.
// ---------------------------------------------------------------------------------------------

class JNum {
  constructor(raw) {
    this.raw = raw;
    this.isInt = !/[.eE]/.test(raw);            // an *integer* is written without fraction/exponent
    this.big = this.isInt ? BigInt(raw) : null; // exact; never converted to binary64
    this.num = Number(raw);                     // nearest binary64 (JS parsing rounds correctly)
  }
  // JSON Schema's view: a number with an integral value, however written.
  get integral() { return this.isInt || Number.isInteger(this.num); }
}

const MAX_DEPTH = 64;
const MAX_INT_DIGITS = 4300;
const JSON_WS = new Set([' ', '\t', '\n', '\r']);

function parseStrictJson(text) {
  let i = 0;
  const n = text.length;
  const fail = (msg) => { throw new JsonError(`${msg} at character ${i}`); };
  const ws = () => { while (i < n && JSON_WS.has(text[i])) i++; };

  function value(depth) {
    if (i >= n) fail('unexpected end of JSON text');
    const ch = text[i];
    if (ch === '{') return object(depth + 1);
    if (ch === '[') return array(depth + 1);
    if (ch === '"') return string();
    if (ch === '-' || (ch >= '0' && ch <= '9')) return number();
    for (const [word, v] of [['true', true], ['false', false], ['null', null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    if (text.startsWith('NaN', i) || text.startsWith('Infinity', i)) fail('non-standard constant');
    fail(`unexpected character ${JSON.stringify(ch)}`);
  }

  function object(depth) {
    if (depth > MAX_DEPTH) fail(`nesting deeper than ${MAX_DEPTH} levels`);
    i++;
    const out = Object.create(null);
    const seen = new Set();
    ws();
    if (text[i] === '}') { i++; return out; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail('expected a string key');
      const key = string();             // compared after escapes are decoded (section 2.2)
      if (seen.has(key)) fail(`duplicate key ${JSON.stringify(key)}`);
      seen.add(key);
      ws();
      if (text[i] !== ':') fail("expected ':'");
      i++; ws();
      out[key] = value(depth);
      ws();
      if (text[i] === ',') { i++; continue; }
      if (text[i] === '}') { i++; return out; }
      fail("expected ',' or '}'");
    }
  }

  function array(depth) {
    if (depth > MAX_DEPTH) fail(`nesting deeper than ${MAX_DEPTH} levels`);
    i++;
    const out = [];
    ws();
    if (text[i] === ']') { i++; return out; }
    for (;;) {
      ws();
      out.push(value(depth));
      ws();
      if (text[i] === ',') { i++; continue; }
      if (text[i] === ']') { i++; return out; }
      fail("expected ',' or ']'");
    }
  }

  function string() {
    i++;
    let out = '';
    for (;;) {
      if (i >= n) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 0x22) { i++; return out; }
      if (c < 0x20) fail('control character in string');
      if (c !== 0x5c) {
        // A raw surrogate cannot come from valid UTF-8, but a string handed in may hold one.
        if (c >= 0xd800 && c <= 0xdbff) {
          const d = text.charCodeAt(i + 1);
          if (!(d >= 0xdc00 && d <= 0xdfff)) fail('lone surrogate');
          out += text[i] + text[i + 1]; i += 2; continue;
        }
        if (c >= 0xdc00 && c <= 0xdfff) fail('lone surrogate');
        out += text[i++]; continue;
      }
      const e = text[i + 1];
      const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
      if (e in simple) { out += simple[e]; i += 2; continue; }
      if (e !== 'u') fail('bad escape');
      const u1 = hex4(i + 2); i += 6;
      if (u1 >= 0xdc00 && u1 <= 0xdfff) fail('lone surrogate escape');
      if (u1 >= 0xd800 && u1 <= 0xdbff) {
        if (text[i] !== '\\' || text[i + 1] !== 'u') fail('lone surrogate escape');
        const u2 = hex4(i + 2);
        if (!(u2 >= 0xdc00 && u2 <= 0xdfff)) fail('lone surrogate escape');
        i += 6;
        out += String.fromCharCode(u1, u2);
        continue;
      }
      out += String.fromCharCode(u1);
    }
  }

  function hex4(at) {
    const h = text.slice(at, at + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(h)) fail('bad \\u escape');
    return parseInt(h, 16);
  }

  function number() {
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 200000));
    if (!m) fail('bad number');
    const raw = m[0];
    i += raw.length;
    if (!m[2] && !m[3]) {
      if (m[1].length > MAX_INT_DIGITS) fail(`integer literal of more than ${MAX_INT_DIGITS} digits`);
    } else if (!Number.isFinite(Number(raw))) {
      fail('number overflows binary64');
    }
    return new JNum(raw);
  }

  ws();
  const v = value(0);
  ws();
  if (i !== n) fail('text after the JSON value');
  return v;
}

const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof JNum);
const isInteger = (v) => v instanceof JNum && v.isInt;
// A parsed text as plain JS values (numbers as binary64), for our own trusted files.
const plainJson = (v) => (v instanceof JNum ? v.num : Array.isArray(v) ? v.map(plainJson) : isObj(v) ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plainJson(x)])) : v);

// ---------------------------------------------------------------------------------------------
// Section 3.2: a small JSON Schema (draft 2020-12) evaluator for the keywords the metadata schema
// uses. It refuses any keyword it does not implement, so a schema change cannot pass unseen.
// ---------------------------------------------------------------------------------------------

const ANNOTATIONS = new Set(['$schema', '$id', 'title', 'description', '$defs']);

function jsonEqual(a, b) {
  if (a instanceof JNum) return typeof b === 'number' ? a.num === b : (b instanceof JNum && a.num === b.num);
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((x, k) => jsonEqual(x, b[k]));
  if (isObj(a)) {
    if (!isObj(b)) return false;
    const ka = Object.keys(a), kb = Object.keys(b);
    return ka.length === kb.length && ka.every((k) => k in b && jsonEqual(a[k], b[k]));
  }
  return a === b;
}

function schemaType(v) {
  if (v === null) return 'null';
  if (typeof v === 'boolean') return 'boolean';
  if (typeof v === 'string') return 'string';
  if (Array.isArray(v)) return 'array';
  if (v instanceof JNum) return 'number';
  return 'object';
}

function schemaErrors(schema, v, root, where = '$') {
  if (schema === true) return [];
  if (schema === false) return [`${where}: not allowed`];
  const errs = [];
  for (const [kw, arg] of Object.entries(schema)) {
    if (ANNOTATIONS.has(kw)) continue;
    switch (kw) {
      case '$ref': {
        if (!arg.startsWith('#/')) throw new Error(`unsupported $ref ${arg}`);
        const target = arg.slice(2).split('/').reduce((o, k) => o[k], root);
        errs.push(...schemaErrors(target, v, root, where));
        break;
      }
      case 'type': {
        const types = Array.isArray(arg) ? arg : [arg];
        const t = schemaType(v);
        const ok = types.some((ty) => ty === t || (ty === 'integer' && t === 'number' && v.integral));
        if (!ok) errs.push(`${where}: not of type ${types.join('/')}`);
        break;
      }
      case 'const': if (!jsonEqual(v, arg)) errs.push(`${where}: must be ${JSON.stringify(arg)}`); break;
      case 'enum': if (!arg.some((a) => jsonEqual(v, a))) errs.push(`${where}: not one of ${JSON.stringify(arg)}`); break;
      case 'required':
        if (isObj(v)) for (const k of arg) if (!(k in v)) errs.push(`${where}: missing ${k}`);
        break;
      case 'properties':
        if (isObj(v)) for (const [k, s] of Object.entries(arg)) if (k in v) errs.push(...schemaErrors(s, v[k], root, `${where}.${k}`));
        break;
      case 'additionalProperties':
        if (isObj(v)) {
          const known = new Set(Object.keys(schema.properties || {}));
          for (const k of Object.keys(v)) if (!known.has(k)) errs.push(...schemaErrors(arg, v[k], root, `${where}[${JSON.stringify(k)}]`));
        }
        break;
      case 'propertyNames':
        if (isObj(v)) for (const k of Object.keys(v)) errs.push(...schemaErrors(arg, k, root, `${where} key ${JSON.stringify(k)}`));
        break;
      case 'minProperties': if (isObj(v) && Object.keys(v).length < arg) errs.push(`${where}: fewer than ${arg} members`); break;
      case 'pattern':
        // ECMA-262 regular expression, matched on the whole string (section 3.2).
        if (typeof v === 'string') {
          const m = new RegExp(arg, 'u').exec(v);
          if (!m || m.index !== 0 || m[0].length !== v.length) errs.push(`${where}: does not match ${arg}`);
        }
        break;
      case 'minLength': if (typeof v === 'string' && [...v].length < arg) errs.push(`${where}: shorter than ${arg}`); break;
      case 'maxLength': if (typeof v === 'string' && [...v].length > arg) errs.push(`${where}: longer than ${arg}`); break;
      case 'minimum': if (v instanceof JNum && !numGe(v, arg)) errs.push(`${where}: below ${arg}`); break;
      case 'maximum': if (v instanceof JNum && !numGe(new JNum(String(arg)), v)) errs.push(`${where}: above ${arg}`); break;
      case 'oneOf': {
        const passing = arg.filter((s) => schemaErrors(s, v, root, where).length === 0).length;
        if (passing !== 1) errs.push(`${where}: matches ${passing} of oneOf's schemas, not 1`);
        break;
      }
      case 'prefixItems':
        if (Array.isArray(v)) arg.forEach((s, k) => { if (k < v.length) errs.push(...schemaErrors(s, v[k], root, `${where}[${k}]`)); });
        break;
      case 'items':
        if (Array.isArray(v)) for (let k = (schema.prefixItems || []).length; k < v.length; k++) errs.push(...schemaErrors(arg, v[k], root, `${where}[${k}]`));
        break;
      case 'minItems': if (Array.isArray(v) && v.length < arg) errs.push(`${where}: fewer than ${arg} items`); break;
      case 'maxItems': if (Array.isArray(v) && v.length > arg) errs.push(`${where}: more than ${arg} items`); break;
      default: throw new Error(`schema keyword ${kw} is not implemented by this checker`);
    }
  }
  return errs;
}

// a >= b for a JNum and a JS number (exactly, for integers).
function numGe(a, b) {
  if (b instanceof JNum) b = b.isInt ? b.big : b.num;
  if (a.isInt && typeof b === 'bigint') return a.big >= b;
  if (a.isInt && Number.isInteger(b)) return a.big >= BigInt(b);
  return a.num >= Number(b);
}

const SCHEMA = plainJson(parseStrictJson(fs.readFileSync(path.join(SPEC_DIR, 'schema', 'metadata-v1.schema.json'), 'utf8')));

// ---------------------------------------------------------------------------------------------
// Binary32 helpers: BF16/F16 widening (section 6.1 step 2), round_D (section 8.1).
// ---------------------------------------------------------------------------------------------

const F32BUF = new DataView(new ArrayBuffer(4));
const bitsToF32 = (u) => { F32BUF.setUint32(0, u >>> 0, true); return F32BUF.getFloat32(0, true); };
const f32ToBits = (x) => { F32BUF.setFloat32(0, x, true); return F32BUF.getUint32(0, true); };

function f16ToF32Bits(h) {
  const sign = (h >>> 15) << 31;
  const exp = (h >>> 10) & 0x1f;
  let mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0;  // Inf, NaN (payload shifted, not quieted)
  if (exp !== 0) return (sign | ((exp - 15 + 127) << 23) | (mant << 13)) >>> 0;
  if (mant === 0) return sign >>> 0;
  let e = -14;                                                        // subnormal: normalise
  while (!(mant & 0x400)) { mant <<= 1; e--; }
  return (sign | ((e + 127) << 23) | ((mant & 0x3ff) << 13)) >>> 0;
}

const bf16ToF32Bits = (b) => (b << 16) >>> 0;

// Round half to even of a non-negative double holding few significant bits (exact steps only).
function rne(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

// round_D for F16: IEEE 754 binary32 -> binary16, RNE, subnormals included, overflow to Inf.
function f32BitsToF16(u) {
  const sign = (u >>> 31) << 15;
  const exp = (u >>> 23) & 0xff;
  if (exp === 0xff) return (u & 0x7fffff) ? (sign | 0x7e00 | ((u & 0x7fffff) >>> 13)) : (sign | 0x7c00);
  const a = Math.abs(bitsToF32(u));
  if (a < 2 ** -14) {                            // result subnormal (or zero): units of 2^-24
    const q = rne(a * 2 ** 24);                  // exact: a power-of-two scaling
    return sign | q;                             // q == 1024 is the smallest normal, bit-correct
  }
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;                           // guard against log2 rounding
  if (2 ** (e + 1) <= a) e++;
  let q = rne(a / 2 ** (e - 10));                // in [1024, 2048]
  if (q === 2048) { q = 1024; e++; }
  if (e > 15) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | (q - 1024);
}

// round_D for BF16: RNE on the bits (section 8.1); a NaN's bits are not specified.
function f32BitsToBf16(u) {
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) & 0x8000) | 0x7fc0;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

// ---------------------------------------------------------------------------------------------
// Section 2: the safetensors container, rules 1.1-1.5. Used for adapters and for base files
// (which tolerate an unknown dtype on tensors, section 2.2).
// ---------------------------------------------------------------------------------------------

const DTYPE_SIZE = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, F8_E8M0: 1, I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4, F64: 8, I64: 8, U64: 8,
};
const HEADER_CAP = 100_000_000;

// Section 11.4: regular files only, never opened in a way that blocks; the descriptor is checked again.
function openRegular(p) {
  let st;
  try { st = fs.statSync(p); } catch { return { error: 'does not exist' }; }
  if (!st.isFile()) return { error: 'is not a regular file' };
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK | fs.constants.O_NOCTTY);
  const st2 = fs.fstatSync(fd);
  if (!st2.isFile()) { fs.closeSync(fd); return { error: 'is not a regular file' }; }
  return { fd, size: st2.size };
}

function readAt(fd, offset, length) {
  const buf = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const r = fs.readSync(fd, buf, got, length - got, offset + got);
    if (r === 0) break;
    got += r;
  }
  return got === length ? buf : buf.subarray(0, got);
}

// Parses a safetensors file. Returns {problems, file} where file is null when a rule 1.x failed.
// The five structure steps of section 7 run in order; a step runs only when those before passed.
function readSafetensors(p, { base = false } = {}) {
  const problems = [];
  const err = (rule, msg, where = null) => problems.push(new Problem(rule, `${p}: ${msg}`, 'error', where));
  const o = openRegular(p);
  if (o.error) { err('1.1', o.error); return { problems, file: null, missing: true }; }
  const { fd, size } = o;
  // Step 1, rule 1.1: size and header length, checked before N bytes are read.
  if (size < 8) { err('1.1', `file of ${size} bytes, shorter than 8`); return { problems, file: null }; }
  const N = readAt(fd, 0, 8).readBigUInt64LE(0);
  if (N < 2n || N > BigInt(HEADER_CAP) || 8n + N > BigInt(size)) {
    err('1.1', `header length ${N} outside [2, ${HEADER_CAP}] or past the end of a ${size}-byte file`);
    return { problems, file: null };
  }
  const n = Number(N);
  // Step 2, rule 1.2: UTF-8 (no BOM), one JSON text within the limits, an object.
  let header;
  try {
    const text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(readAt(fd, 8, n));
    header = parseStrictJson(text);
  } catch (e) {
    err('1.2', `header is not strict UTF-8 JSON: ${e.message}`);
    return { problems, file: null };
  }
  if (!isObj(header)) { err('1.2', 'header is not a JSON object'); return { problems, file: null }; }
  // Step 3: rule 1.3 per tensor entry, rule 1.5 for __metadata__, independently.
  const tensors = new Map();
  let metadata = null;
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (entry === null) continue;
      if (!isObj(entry) || !Object.values(entry).every((v) => typeof v === 'string')) {
        err('1.5', '__metadata__ is not an object of strings');
      } else metadata = entry;
      continue;
    }
    const why = checkEntry(entry, base);
    if (why) { err('1.3', `tensor ${JSON.stringify(name)}: ${why}`, name); continue; }
    tensors.set(name, {
      name, dtype: entry.dtype, shape: entry.shape.map((d) => d.big),
      begin: entry.data_offsets[0].big, end: entry.data_offsets[1].big,
    });
  }
  if (problems.length) return { problems, file: null };
  // Step 4, rule 1.4: the byte ranges tile the data section exactly.
  const dataStart = 8 + n;
  const dataLen = BigInt(size - dataStart);
  const ranges = [...tensors.values()].sort((a, b) => (a.begin < b.begin ? -1 : a.begin > b.begin ? 1 : a.end < b.end ? -1 : a.end > b.end ? 1 : 0));
  let pos = 0n;
  for (const t of ranges) {
    if (t.begin !== pos) {
      err('1.4', `tensor ${JSON.stringify(t.name)} begins at ${t.begin}, not ${pos} (${t.begin < pos ? 'overlap' : 'gap'})`, t.name);
      return { problems, file: null };
    }
    pos = t.end;
  }
  if (pos !== dataLen) {
    err('1.4', pos < dataLen ? `${dataLen - pos} trailing bytes` : `data section ${dataLen - pos} bytes short`);
    return { problems, file: null };
  }
  const file = {
    path: p, fd, dataStart, tensors, metadata, header,
    bytes(t) { return readAt(fd, dataStart + Number(t.begin), Number(t.end - t.begin)); },
  };
  return { problems, file };
}

// Rule 1.3 for one tensor entry; returns why it fails, or null.
function checkEntry(e, base) {
  if (!isObj(e)) return 'entry is not an object';
  const keys = Object.keys(e).sort();
  if (keys.join(',') !== 'data_offsets,dtype,shape') return `fields ${JSON.stringify(keys)}, not exactly dtype, shape, data_offsets`;
  if (typeof e.dtype !== 'string') return 'dtype is not a string';
  const known = e.dtype in DTYPE_SIZE;
  // Section 2.2: a base tolerates an unknown dtype written the way safetensors writes names.
  if (!known && !(base && /^[A-Z][A-Z0-9_]{0,31}$/.test(e.dtype))) return `unknown dtype ${JSON.stringify(e.dtype)}`;
  if (!Array.isArray(e.shape) || !e.shape.every((d) => isInteger(d) && d.big >= 0n)) return 'shape is not an array of non-negative integers';
  const off = e.data_offsets;
  if (!Array.isArray(off) || off.length !== 2 || !off.every(isInteger)) return 'data_offsets is not a pair of integers';
  if (!(off[0].big >= 0n && off[0].big <= off[1].big)) return 'data_offsets not 0 <= begin <= end';
  if (!known) return null;                               // offsets checked (1.4), byte length not
  const numel = e.shape.reduce((a, d) => a * d.big, 1n); // BigInt: cannot overflow
  const want = numel * BigInt(DTYPE_SIZE[e.dtype]);
  if (off[1].big - off[0].big !== want) return `byte length ${off[1].big - off[0].big} != ${want} (shape x dtype size)`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Sections 3 and 2.5: the metadata document (rules 2.1-2.3) and the tensors (3.1-3.4).
// ---------------------------------------------------------------------------------------------

function checkDocument(metadata) {
  // Section 3.3: parse + format (2.2); version (2.3); schema (2.2); integers and patterns (2.2).
  if (!metadata || !('neuroada' in metadata)) return { rule: '2.1', msg: '__metadata__ has no neuroada key' };
  let doc;
  try { doc = parseStrictJson(metadata.neuroada); } catch (e) { return { rule: '2.2', msg: `document is not strict JSON: ${e.message}` }; }
  if (!isObj(doc)) return { rule: '2.2', msg: 'document is not a JSON object' };
  if (doc.format !== 'neuroada') return { rule: '2.2', msg: 'format is not "neuroada"' };
  const v = doc.version;
  if (typeof v !== 'string') return { rule: '2.3', msg: 'version missing or not a string' };
  const m = /^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$/.exec(v);
  if (!m) return { rule: '2.3', msg: `version ${JSON.stringify(v)} is not MAJOR.MINOR` };
  if (m[1] !== '1') return { rule: '2.3', msg: `written for spec version ${v.length > 40 ? v.slice(0, 40) + '…' : v}, a major version this reader does not support (1.x)` };
  const errs = schemaErrors(SCHEMA, doc, SCHEMA);
  if (errs.length) return { rule: '2.2', msg: `schema: ${errs[0]}` };
  // Integers written without fraction or exponent (section 3.1); patterns were matched whole above.
  for (const [t, tgt] of Object.entries(doc.targets)) {
    if (!isInteger(tgt.k) || !tgt.shape.every(isInteger)) return { rule: '2.2', msg: `target ${JSON.stringify(t)}: k or shape not written as an integer` };
  }
  const seed = doc.selection.seed;
  if (seed !== undefined && seed !== null && !isInteger(seed)) return { rule: '2.2', msg: 'selection.seed not written as an integer' };
  return { doc };
}

// Targets with plain numbers, for the later tiers.
function targetsOf(doc) {
  return Object.entries(doc.targets).map(([name, t]) => ({
    name, dOut: Number(t.shape[0].big), dIn: Number(t.shape[1].big), k: Number(t.k.big),
    layout: t.layout, dtype: t.dtype, probe: t.probe,
  }));
}

// Section 7, structure step 5 after the document: rules 3.1-3.4.
function checkTensors(file, targets, problems) {
  const err = (rule, msg, where, sev = 'error') => problems.push(new Problem(rule, `${file.path}: ${msg}`, sev, where));
  const declared = new Set(targets.map((t) => t.name));
  for (const name of file.tensors.keys()) {
    const t = name.startsWith('indices/') ? name.slice(8) : name.startsWith('values/') ? name.slice(7) : null;
    if (t === null || !declared.has(t)) err('3.1', `tensor ${JSON.stringify(name)} belongs to no declared target`, name);
  }
  const usable = [];
  for (const t of targets) {
    const idx = file.tensors.get('indices/' + t.name), val = file.tensors.get('values/' + t.name);
    if (!idx || !val) { err('3.1', `target ${JSON.stringify(t.name)} lacks its ${!idx ? 'indices' : 'values'} tensor`, t.name); continue; }
    let ok = true;
    if (idx.dtype !== 'I16' && idx.dtype !== 'I32') { err('3.2', `indices dtype ${idx.dtype}`, t.name); ok = false; }
    else if (idx.dtype === 'I16' && t.dIn > 32768) { err('3.2', `I16 indices for d_in ${t.dIn} > 32768`, t.name); ok = false; }
    else if (idx.dtype === 'I32' && t.dIn <= 32768) err('3.2', `I32 indices where I16 suffices (d_in ${t.dIn})`, t.name, 'warning');
    if (!['BF16', 'F16', 'F32'].includes(val.dtype)) { err('3.3', `values dtype ${val.dtype}`, t.name); ok = false; }
    const shapeOk = (s) => s.length === 2 && s[0] === BigInt(t.dOut) && s[1] === BigInt(t.k);
    if (t.k > t.dIn || !shapeOk(idx.shape) || !shapeOk(val.shape)) {
      err('3.4', `k ${t.k} > d_in ${t.dIn}, or shapes ${fmtShape(idx.shape)} / ${fmtShape(val.shape)} not [${t.dOut}, ${t.k}]`, t.name); ok = false;
    }
    if (ok) usable.push({ ...t, idx, val });
  }
  return usable;
}

const fmtShape = (s) => `[${s.join(', ')}]`;

// Decoded arrays of a target: indices as Int32Array, values as binary32 bits (Uint32Array).
function loadArrays(file, t) {
  const ib = file.bytes(t.idx), vb = file.bytes(t.val);
  const n = t.dOut * t.k;
  const indices = new Int32Array(n), values = new Uint32Array(n);
  for (let e = 0; e < n; e++) {
    indices[e] = t.idx.dtype === 'I16' ? ib.readInt16LE(2 * e) : ib.readInt32LE(4 * e);
    values[e] = t.val.dtype === 'F32' ? vb.readUInt32LE(4 * e)
      : t.val.dtype === 'F16' ? f16ToF32Bits(vb.readUInt16LE(2 * e)) : bf16ToF32Bits(vb.readUInt16LE(2 * e));
  }
  return { indices, values };
}

// Tier 2 (content): rules 3.5, 3.6, 3.7 per target, independently; first offender of each.
function checkContent(file, t, arrays, problems) {
  const err = (rule, msg) => problems.push(new Problem(rule, `${file.path}: target ${JSON.stringify(t.name)}: ${msg}`, 'error', t.name));
  const { indices, values } = arrays;
  let r35 = null, r36 = null, r37 = null;
  for (let r = 0; r < t.dOut; r++) {
    for (let j = 0; j < t.k; j++) {
      const e = r * t.k + j, c = indices[e];
      if (r35 === null && (c < 0 || c >= t.dIn)) r35 = `index ${c} at [${r}, ${j}] outside [0, ${t.dIn})`;
      if (r36 === null && j > 0 && !(indices[e - 1] < c)) r36 = `row ${r} not strictly increasing at ${j}`;
      if (r37 === null && (values[e] & 0x7f800000) === 0x7f800000) r37 = `value at [${r}, ${j}] is not finite`;
    }
  }
  if (r35) err('3.5', r35);
  if (r36) err('3.6', r36);
  if (r37) err('3.7', r37);
}

// Reads an adapter file through tiers 1 and 2. Returns {problems, file, doc, targets}.
function readAdapter(p) {
  const { problems, file } = readSafetensors(p);
  if (!file) return { problems };
  const d = checkDocument(file.metadata);
  if (d.rule) { problems.push(new Problem(d.rule, `${p}: ${d.msg}`)); return { problems, file }; }
  const targets = checkTensors(file, targetsOf(d.doc), problems);
  const out = { problems, file, doc: d.doc, targets };
  if (problems.some((q) => q.severity === 'error')) return out;
  for (const t of targets) { t.arrays = loadArrays(file, t); checkContent(file, t, t.arrays, problems); }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Section 2.6: opening a base. A base offers tensors by key: {dtype, storedShape, canon(t)} where
// canon gives the canonical binary32 bits in GGUF cases; safetensors tensors give raw bytes.
// ---------------------------------------------------------------------------------------------

function openBase(p) {
  let st;
  try { st = fs.statSync(p); } catch { throw new BaseUnreadable('1.1', `base ${p} does not exist`); }
  if (st.isDirectory()) return openFolderBase(p);
  const lower = path.basename(p).toLowerCase();
  if (lower.endsWith('.gguf')) return openGgufBase(p);
  if (lower.endsWith('.onnx')) return openOnnxBase(p);
  return safetensorsBase([baseFile(p)]);
}

// One safetensors file of a base: container rules as for an adapter, and no neuroada key.
function baseFile(p) {
  const { problems, file } = readSafetensors(p, { base: true });
  if (!file) { const q = problems[0]; throw new BaseUnreadable(q.rule, q.message); }
  if (file.metadata && 'neuroada' in file.metadata) throw new BaseUnreadable('1.6', `${p} is an adapter, not a base`);
  return file;
}

function openFolderBase(dir) {
  const names = fs.readdirSync(dir);
  const has = (nm) => names.includes(nm);
  if (has('model.safetensors.index.json')) {
    const ip = path.join(dir, 'model.safetensors.index.json');
    const o = openRegular(ip);
    if (o.error) throw new BaseUnreadable('1.6', `${ip} ${o.error}`);
    if (o.size > HEADER_CAP) throw new BaseUnreadable('1.6', `${ip} is larger than ${HEADER_CAP} bytes`);
    let index;
    try { index = parseStrictJson(new TextDecoder('utf-8', { fatal: true }).decode(readAt(o.fd, 0, o.size))); }
    catch (e) { throw new BaseUnreadable('1.6', `${ip} is not strict JSON: ${e.message}`); }
    finally { fs.closeSync(o.fd); }
    if (!isObj(index) || !isObj(index.weight_map)) throw new BaseUnreadable('1.6', `${ip} has no weight_map object`);
    const wm = index.weight_map;
    const shards = new Set();
    for (const [key, shard] of Object.entries(wm)) {
      // Section 11.3: a plain file name inside the folder, checked before anything is opened.
      if (typeof shard !== 'string' || shard === '' || shard === '.' || shard === '..' || /[/\\\0]/.test(shard) || path.isAbsolute(shard)) {
        throw new BaseUnreadable('1.6', `${ip}: shard name ${JSON.stringify(shard)} for ${JSON.stringify(key)} is not a plain file name`);
      }
      shards.add(shard);
    }
    if (has('model.safetensors') && [...shards].some((s) => s !== 'model.safetensors')) {
      throw new BaseUnreadable('1.6', `${dir} holds model.safetensors beside an index naming other files`);
    }
    const files = new Map();
    for (const s of [...shards].sort()) files.set(s, baseFile(path.join(dir, s)));
    const listed = new Map();
    for (const [key, shard] of Object.entries(wm)) {
      const f = files.get(shard);
      if (!f.tensors.has(key)) throw new BaseUnreadable('1.6', `${ip}: ${JSON.stringify(key)} is not in shard ${shard}`);
      listed.set(key, { file: f, t: f.tensors.get(key) });
    }
    return safetensorsBase(null, listed);
  }
  if (has('model.safetensors')) return safetensorsBase([baseFile(path.join(dir, 'model.safetensors'))]);
  const candidates = names.filter((nm) => nm.endsWith('.safetensors') && !nm.startsWith('.'));
  if (candidates.length !== 1) throw new BaseUnreadable('1.6', `${dir} holds ${candidates.length} .safetensors files, not one`);
  if (candidates[0] === 'adapter_model.safetensors' && has('adapter_config.json')) {
    throw new BaseUnreadable('1.6', `${dir} is a PEFT adapter folder, not a base`);
  }
  return safetensorsBase([baseFile(path.join(dir, candidates[0]))]);
}

function safetensorsBase(files, listed = null) {
  if (!listed) {
    listed = new Map();
    for (const f of files) for (const [k, t] of f.tensors) listed.set(k, { file: f, t });
  }
  return {
    kind: 'safetensors',
    structureHash: structureHash([...listed.values()].map(({ t }) => [t.name, t.dtype, t.shape])),
    // Section 4.1/4.2 for a target: the base tensor, its dtype and the canonical binary32 bits.
    resolve(target, problems) {
      const hit = listed.get(target.name);
      if (!hit) return fail(problems, '4.1', target, 'the base has no tensor of this key');
      const { file, t } = hit;
      const stored = target.layout === 'out_in' ? [target.dOut, target.dIn] : [target.dIn, target.dOut];
      if (t.shape.length !== 2 || t.shape[0] !== BigInt(stored[0]) || t.shape[1] !== BigInt(stored[1])) {
        return fail(problems, '4.2', target, `stored shape ${fmtShape(t.shape)}, not ${fmtShape(stored)} for layout ${target.layout}`);
      }
      if (!['F32', 'F16', 'BF16'].includes(t.dtype)) return fail(problems, '4.2', target, `base dtype ${t.dtype} cannot be read as binary32`);
      return { dtype: t.dtype, bits: storedToCanonical(widen(file.bytes(t), t.dtype), target) };
    },
  };
}

function fail(problems, rule, target, msg) {
  problems.push(new Problem(rule, `target ${JSON.stringify(target.name)}: ${msg}`, 'error', target.name));
  return null;
}

// Section 6.1 step 2: stored values of F32/F16/BF16 as binary32 bits.
function widen(buf, dtype) {
  const size = dtype === 'F32' ? 4 : 2;
  const out = new Uint32Array(buf.length / size);
  for (let e = 0; e < out.length; e++) {
    out[e] = dtype === 'F32' ? buf.readUInt32LE(4 * e) : dtype === 'F16' ? f16ToF32Bits(buf.readUInt16LE(2 * e)) : bf16ToF32Bits(buf.readUInt16LE(2 * e));
  }
  return out;
}

// Section 4.1: stored order -> canonical [d_out, d_in] row-major.
function storedToCanonical(stored, target) {
  if (target.layout === 'out_in') return stored;
  const out = new Uint32Array(stored.length);
  for (let r = 0; r < target.dOut; r++) for (let c = 0; c < target.dIn; c++) out[r * target.dIn + c] = stored[c * target.dOut + r];
  return out;
}

// Section 6.2: the structure hash; null when a name holds TAB or LF.
function structureHash(entries) {
  const lines = [];
  for (const [name, dtype, shape] of entries) {
    if (/[\t\n]/.test(name)) return null;
    lines.push(Buffer.from(`${name}\t${dtype}\t${shape.join(',')}\n`, 'utf8'));
  }
  lines.sort(Buffer.compare);
  return 'sha256:' + crypto.createHash('sha256').update(Buffer.concat(lines)).digest('hex');
}

// ---------------------------------------------------------------------------------------------
// Section 15: GGUF bases. 15.1 reading, 15.2 names/rows/decoding.
// ---------------------------------------------------------------------------------------------

// GGML types: [name, block size, bytes per block]. The container's own table (ggml's gguf.md);
// SPEC.md writes out the layouts of the types it decodes.
const GGML_TYPES = {
  0: ['F32', 1, 4], 1: ['F16', 1, 2], 2: ['Q4_0', 32, 18], 3: ['Q4_1', 32, 20], 6: ['Q5_0', 32, 22],
  7: ['Q5_1', 32, 24], 8: ['Q8_0', 32, 34], 9: ['Q8_1', 32, 36], 10: ['Q2_K', 256, 84], 11: ['Q3_K', 256, 110],
  12: ['Q4_K', 256, 144], 13: ['Q5_K', 256, 176], 14: ['Q6_K', 256, 210], 15: ['Q8_K', 256, 292],
  16: ['IQ2_XXS', 256, 66], 17: ['IQ2_XS', 256, 74], 18: ['IQ3_XXS', 256, 98], 19: ['IQ1_S', 256, 50],
  20: ['IQ4_NL', 32, 18], 21: ['IQ3_S', 256, 110], 22: ['IQ2_S', 256, 82], 23: ['IQ4_XS', 256, 136],
  24: ['I8', 1, 1], 25: ['I16', 1, 2], 26: ['I32', 1, 4], 27: ['I64', 1, 8], 28: ['F64', 1, 8],
  29: ['IQ1_M', 256, 56], 30: ['BF16', 1, 2], 34: ['TQ1_0', 256, 54], 35: ['TQ2_0', 256, 66], 39: ['MXFP4', 32, 17],
};

// GGUF metadata value types: fixed sizes; 8 = string, 9 = array.
const GGUF_SCALAR = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };

function parseGguf(p) {
  const bad = (msg) => { throw new BaseUnreadable('1.6', `${p}: ${msg}`); };
  const o = openRegular(p);
  if (o.error) throw new BaseUnreadable('1.1', `base ${p} ${o.error}`);
  const { fd, size } = o;
  let pos = 0;
  let win = Buffer.alloc(0), winAt = 0;
  const take = (len) => {                              // every length checked against the bytes left
    if (len < 0 || pos + len > size) bad(`truncated: ${len} bytes needed at offset ${pos}`);
    if (pos < winAt || pos + len > winAt + win.length) { winAt = pos; win = readAt(fd, pos, Math.max(len, 1 << 16)); }
    const b = win.subarray(pos - winAt, pos - winAt + len);
    pos += len;
    return b;
  };
  const left = () => size - pos;
  const u32 = () => take(4).readUInt32LE(0);
  const u64 = () => { const v = take(8).readBigUInt64LE(0); if (v > BigInt(size)) return Infinity; return Number(v); };
  const str = (max) => {
    const len = u64();
    if (len > left()) bad('string past the end of the file');
    if (max !== undefined && len > max) bad(`string of ${len} bytes, more than ${max}`);
    return new TextDecoder('utf-8', { fatal: false }).decode(take(len));
  };
  const scalar = (type) => {
    const b = take(GGUF_SCALAR[type]);
    switch (type) {
      // integers as BigInt, so that an integer-typed value is told from a float one (15.1, 15.2)
      case 0: return BigInt(b.readUInt8(0)); case 1: return BigInt(b.readInt8(0)); case 2: return BigInt(b.readUInt16LE(0));
      case 3: return BigInt(b.readInt16LE(0)); case 4: return BigInt(b.readUInt32LE(0)); case 5: return BigInt(b.readInt32LE(0));
      case 6: return b.readFloatLE(0); case 7: return b.readUInt8(0) !== 0; case 10: return b.readBigUInt64LE(0);
      case 11: return b.readBigInt64LE(0); default: return b.readDoubleLE(0);
    }
  };
  const valueOf = (type, depth) => {
    if (type in GGUF_SCALAR) return scalar(type);
    if (type === 8) return str();
    if (type !== 9) bad(`metadata value type ${type} is not one of the 13 GGUF types`);
    if (depth >= 2) bad('arrays nested more than two deep');
    const et = u32();
    const count = u64();
    const least = et in GGUF_SCALAR ? GGUF_SCALAR[et] : et === 9 ? 12 : 8;   // 15.1: an inner array is type + count at least
    if (!(et in GGUF_SCALAR) && et !== 8 && et !== 9) bad(`array element type ${et} unknown`);
    if (count * least > left()) bad(`array of ${count} elements past the end of the file`);
    const out = [];
    for (let k = 0; k < count; k++) out.push(valueOf(et, depth + 1));
    return out;
  };

  if (size < 4 || take(4).toString('latin1') !== 'GGUF') bad('no GGUF magic');
  const version = u32();
  if (version !== 2 && version !== 3) bad(`GGUF version ${version}, not 2 or 3`);
  const nTensors = u64(), nKv = u64();
  if (nKv * 14 > left()) bad(`${nKv} key/value pairs cannot fit`);
  const kv = new Map();
  for (let k = 0; k < nKv; k++) {
    const key = str(65535);
    if (kv.has(key)) bad(`metadata key ${JSON.stringify(key)} twice`);
    kv.set(key, valueOf(u32(), 0));
  }
  if (nTensors * 33 > left()) bad(`${nTensors} tensor entries cannot fit`);
  let alignment = 32;
  if (kv.has('general.alignment')) {
    const raw = kv.get('general.alignment');
    const a = typeof raw === 'bigint' && raw > 0n && raw <= 1n << 20n ? Number(raw) : NaN;
    if (!(a > 0 && (a & (a - 1)) === 0)) bad(`general.alignment ${raw} is not an integer power of two up to 2^20`);
    alignment = a;
  }
  const infos = [];
  const byName = new Map();
  for (let k = 0; k < nTensors; k++) {
    const name = str(1024);
    if (byName.has(name)) bad(`tensor ${JSON.stringify(name)} twice`);
    const nd = u32();
    if (nd < 1 || nd > 4) bad(`tensor ${JSON.stringify(name)} has ${nd} dimensions`);
    const ne = [];
    for (let d = 0; d < nd; d++) { const v = take(8).readBigUInt64LE(0); if (v === 0n) bad(`tensor ${JSON.stringify(name)} has a zero dimension`); ne.push(v); }
    const type = u32();
    if (!(type in GGML_TYPES)) bad(`tensor ${JSON.stringify(name)} has unknown type ${type}`);
    const offset = take(8).readBigUInt64LE(0);
    const [tname, bs, bb] = GGML_TYPES[type];
    if (ne[0] % BigInt(bs) !== 0n) bad(`tensor ${JSON.stringify(name)}: first dimension not a multiple of ${bs}`);
    if (offset % BigInt(alignment) !== 0n) bad(`tensor ${JSON.stringify(name)}: offset not aligned`);
    const numel = ne.reduce((a, d) => a * d, 1n);
    const info = { name, ne, type: tname, bs, bb, offset, nbytes: (numel / BigInt(bs)) * BigInt(bb), numel };
    infos.push(info); byName.set(name, info);
  }
  const dataStart = BigInt(Math.ceil(pos / alignment) * alignment);
  const sorted = [...infos].sort((a, b) => (a.offset < b.offset ? -1 : a.offset > b.offset ? 1 : 0));
  let end = 0n;
  for (const t of sorted) {
    if (t.offset < end) bad(`tensor ${JSON.stringify(t.name)} overlaps another`);
    end = t.offset + t.nbytes;
    if (dataStart + end > BigInt(size)) bad(`tensor ${JSON.stringify(t.name)} data past the end of the file`);
  }
  return { path: p, fd, kv, byName, dataStart, bytes: (t) => readAt(fd, Number(dataStart + t.offset), Number(t.nbytes)) };
}

const GGUF_NAMES = parseStrictJson(fs.readFileSync(path.join(SPEC_DIR, 'gguf-names.json'), 'utf8'));
const NAMES = plainJson(GGUF_NAMES);
// Section 15.2: the architectures whose converter keeps every linear weight as the checkpoint holds it.
const MAPPED_ARCHS = new Set(['llama', 'mistral3', 'qwen2', 'qwen3', 'qwen2moe', 'qwen3moe', 'gemma', 'gemma2', 'gemma3',
  'gemma4', 'phi3', 'starcoder2', 'stablelm', 'nemotron', 'gpt2', 'bloom', 'falcon', 'gpt-oss', 'lfm2']);

// Section 15.2: a Hugging Face key -> {gguf name, stem} for an architecture, or null.
function mapKey(arch, blockCount, key) {
  let k = key;
  if (arch === 'gemma3') {
    if (k.startsWith('language_model.model.')) k = 'model.' + k.slice('language_model.model.'.length);
    else if (k.startsWith('language_model.lm_head.')) k = 'lm_head.' + k.slice('language_model.lm_head.'.length);
    else if (k.startsWith('model.language_model.')) k = 'model.' + k.slice('model.language_model.'.length);
  } else if (arch === 'gemma4') {
    if (k.startsWith('model.language_model.')) k = 'model.' + k.slice('model.language_model.'.length);
  } else if (arch === 'mistral3') {
    if (k.startsWith('language_model.')) k = k.slice('language_model.'.length);
  } else if (arch === 'bloom') {
    if (k.startsWith('transformer.')) k = k.slice('transformer.'.length);
  }
  const m = /^(.*)\.(weight|bias)$/.exec(k);
  const candidates = m ? [[m[1], '.' + m[2]], [k, '']] : [[k, '']];
  const table = NAMES.architectures[arch] || {};
  for (const [stem, suffix] of candidates) {
    if (arch === 'lfm2' && /^model\.layers\.\d+\.conv\.conv$/.test(stem)) return null;
    for (const [gname, keys] of Object.entries(table)) {
      for (const pat of keys) {
        const re = new RegExp('^' + pat.split('{N}').map(escapeRe).join('(0|[1-9][0-9]*)') + '$');
        const mm = re.exec(stem);
        if (!mm) continue;
        const ns = mm.slice(1).map(Number);
        if (ns.some((x) => x >= blockCount) || new Set(ns).size > 1) continue;
        const g = gname.replace('{N}', String(ns[0])) + suffix;
        if (arch === 'falcon' && /attn_qkv\.bias$/.test(g)) return null;  // no known row order
        return { gguf: g, stem };
      }
    }
  }
  return null;
}
const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

// An integer-typed GGUF value that is positive, else null (a float or string is no count).
function positiveInt(v) {
  return typeof v === 'bigint' && v > 0n && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : null;
}

// Section 15.1 (since 1.6): a split GGUF set (llama.cpp's gguf-split), given by its first shard, read as one file:
// the first shard's metadata, the tensors of every shard, each read from its own shard.
const SPLIT_NO = 'split.no', SPLIT_COUNT = 'split.count', SPLIT_TENSORS = 'split.tensors.count';
const pad5 = (n) => String(n).padStart(5, '0');   // %05d

// {no, count} of a shard of a set of two or more; null for a whole file (neither key, or a split.count of 1).
function splitOf(g) {
  if (!g.kv.has(SPLIT_NO) && !g.kv.has(SPLIT_COUNT)) return null;
  const no = g.kv.get(SPLIT_NO), count = g.kv.get(SPLIT_COUNT);
  if (count === 1n) return null;
  if (typeof no !== 'bigint' || typeof count !== 'bigint' || no < 0n || no >= count) {
    throw new BaseUnreadable('1.6', `${g.path}: ${SPLIT_NO} ${no} and ${SPLIT_COUNT} ${count} are not integers with 0 <= no < count`);
  }
  return { no: Number(no), count: Number(count) };
}

function readGgufBase(p) {
  const first = parseGguf(p);
  const split = splitOf(first);
  if (!split) return first;
  const bad = (file, msg) => { throw new BaseUnreadable('1.6', `${file}: ${msg}`); };
  const { no, count } = split;
  if (no !== 0) bad(p, `shard ${no + 1} of ${count} of a split set, not a base by itself (give the first shard)`);
  const suffix = `-00001-of-${pad5(count)}.gguf`;
  const name = path.basename(p);
  if (!name.endsWith(suffix)) bad(p, `the first shard of a set of ${count}, not named PREFIX${suffix}: its other shards cannot be found`);
  const prefix = name.slice(0, name.length - suffix.length);
  const total = first.kv.get(SPLIT_TENSORS);
  const owner = new Map([...first.byName.keys()].map((t) => [t, first]));
  const byName = new Map(first.byName);
  for (let i = 1; i < count; i++) {
    const sp = path.join(path.dirname(p), `${prefix}-${pad5(i + 1)}-of-${pad5(count)}.gguf`);
    let s;
    try { s = parseGguf(sp); } catch (e) {
      if (e instanceof BaseUnreadable && e.rule === '1.1') bad(sp, `shard ${i + 1} of ${count} cannot be opened (${e.message})`);
      throw e;
    }
    const got = splitOf(s);
    if (!got || got.no !== i || got.count !== count) bad(sp, `${SPLIT_NO} ${s.kv.get(SPLIT_NO)}, ${SPLIT_COUNT} ${s.kv.get(SPLIT_COUNT)}: not shard ${i + 1} of ${count}`);
    if (s.kv.get(SPLIT_TENSORS) !== total) bad(sp, `${SPLIT_TENSORS} ${s.kv.get(SPLIT_TENSORS)}, the first shard's ${total}`);
    for (const [t, info] of s.byName) {
      if (byName.has(t)) bad(sp, `tensor ${JSON.stringify(t)} is also in ${path.basename(owner.get(t).path)}`);
      byName.set(t, info); owner.set(t, s);
    }
  }
  if (typeof total !== 'bigint' || BigInt(byName.size) !== total) bad(p, `the shards hold ${byName.size} tensors, ${SPLIT_TENSORS} is ${total}`);
  return { path: p, kv: first.kv, byName, bytes: (t) => owner.get(t.name).bytes(t) };
}

function openGgufBase(p) {
  const g = readGgufBase(p);
  const arch = typeof g.kv.get('general.architecture') === 'string' ? g.kv.get('general.architecture') : null;
  const claimed = new Map();
  return {
    kind: 'gguf',
    structureHash: undefined,      // section 15.2: warning 4.5 does not apply
    resolve(target, problems) {
      let info = g.byName.get(target.name), perm = null, transposed = false;
      if (!info) {
        if (!arch || !MAPPED_ARCHS.has(arch)) return fail(problems, '4.1', target, `not a tensor of the file, and architecture ${arch} is not mapped`);
        const blockCount = positiveInt(g.kv.get(`${arch}.block_count`)) ?? 0;
        const mk = mapKey(arch, blockCount, target.name);
        if (!mk || !g.byName.has(mk.gguf)) return fail(problems, '4.1', target, `maps to ${mk ? mk.gguf : 'nothing'}, no tensor of the file`);
        info = g.byName.get(mk.gguf);
        const dOut = target.dOut;
        const headSize = (n) => {
          const kl = positiveInt(g.kv.get(`${arch}.attention.key_length`));
          if (kl) return kl;
          const emb = positiveInt(g.kv.get(`${arch}.embedding_length`));
          return emb ? emb / n : null;
        };
        if (NAMES.rope_permuted.includes(arch) && /^blk\.\d+\.attn_[qk]\./.test(mk.gguf) && /(q_proj|k_proj)$/.test(mk.stem)) {
          const nq = positiveInt(g.kv.get(`${arch}.attention.head_count`));
          if (!nq) throw new BaseUnreadable('1.6', `${p}: ${arch}.attention.head_count missing or not a positive integer`);
          let n = nq;
          if (/attn_k\./.test(mk.gguf) && g.kv.has(`${arch}.attention.head_count_kv`)) {
            n = positiveInt(g.kv.get(`${arch}.attention.head_count_kv`));
            if (!n) throw new BaseUnreadable('1.6', `${p}: head_count_kv not a positive integer`);
          }
          const hs = headSize(nq);
          if (dOut % (2 * n) !== 0 || (hs !== null && dOut !== n * hs)) return fail(problems, '4.2', target, `d_out ${dOut} is not ${n} heads of the file's head size`);
          const h = dOut / n / 2;
          perm = new Int32Array(dOut);   // GGUF row i holds HF row perm[i]
          for (let a = 0; a < n; a++) for (let b = 0; b < h; b++) for (let c = 0; c < 2; c++) perm[a * 2 * h + b * 2 + c] = a * 2 * h + c * h + b;
        } else if (NAMES.qkv_regrouped.includes(arch) && /query_key_value$/.test(mk.stem) && /^blk\.\d+\.attn_qkv\./.test(mk.gguf)) {
          const n = positiveInt(g.kv.get(`${arch}.attention.head_count`));
          if (!n) throw new BaseUnreadable('1.6', `${p}: head_count missing or not a positive integer`);
          let gr = n;
          if (arch === 'falcon') {
            gr = positiveInt(g.kv.get(`${arch}.attention.head_count_kv`));
            if (!gr) throw new BaseUnreadable('1.6', `${p}: falcon head_count_kv missing or not positive`);
          } else if (g.kv.has(`${arch}.attention.head_count_kv`) && positiveInt(g.kv.get(`${arch}.attention.head_count_kv`)) !== n) {
            throw new BaseUnreadable('1.6', `${p}: bloom head_count_kv differs from head_count`);
          }
          const hs = headSize(n);
          if (n % gr !== 0 || dOut % (n + 2 * gr) !== 0 || (hs !== null && dOut !== (n + 2 * gr) * hs)) return fail(problems, '4.2', target, `d_out ${dOut} does not fit ${n} heads in ${gr} groups`);
          const h = dOut / (n + 2 * gr), per = n / gr + 2;
          perm = new Int32Array(dOut);
          let i = 0;
          for (const part of ['q', 'k', 'v']) for (let a = 0; a < gr; a++) {
            const heads = part === 'q' ? [...Array(per - 2).keys()] : [part === 'k' ? per - 2 : per - 1];
            for (const hd of heads) for (let x = 0; x < h; x++) perm[i++] = (a * per + hd) * h + x;
          }
        }
        if (arch === 'gpt2' && /^blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\./.test(mk.gguf)) transposed = true;
      }
      if (claimed.has(info.name)) return fail(problems, '4.1', target, `names GGUF tensor ${info.name}, as target ${JSON.stringify(claimed.get(info.name))} does`);
      claimed.set(info.name, target.name);
      // Canonical shape: ne = [d_in, d_out] fastest first. Section 15.2: only a 1-D tensor whose name ends in the
      // parts ffn_gate_inp_shexp and weight is a one-row matrix; other 1-D tensors are [ne0], never reshaped.
      const ne = info.ne.map(Number);
      if (ne.length > 2) return fail(problems, '4.2', target, `GGUF tensor ${info.name} has ${ne.length} dimensions`);
      const parts = info.name.split('.');
      const oneRow = ne.length === 1 && parts.length >= 2 && parts[parts.length - 2] === 'ffn_gate_inp_shexp' && parts[parts.length - 1] === 'weight';
      if (ne.length === 1 && !oneRow) return fail(problems, '4.2', target, `GGUF tensor ${info.name} is 1-D [${ne[0]}], not a one-row linear weight`);
      const canon = ne.length === 1 ? [1, ne[0]] : [ne[1], ne[0]];
      let expectStored = target.layout === 'out_in' ? [target.dOut, target.dIn] : [target.dIn, target.dOut];
      const storedGguf = transposed ? [canon[1], canon[0]] : canon;
      if (transposed && target.layout !== 'in_out') return fail(problems, '4.2', target, 'a GPT-2 Conv1D key needs layout in_out');
      if (!transposed && target.layout !== 'out_in') return fail(problems, '4.2', target, 'a GGUF tensor is stored out_in');
      if (storedGguf[0] !== expectStored[0] || storedGguf[1] !== expectStored[1]) {
        return fail(problems, '4.2', target, `GGUF tensor ${info.name} has shape ${fmtShape(canon)}`);
      }
      const decoded = decodeGguf(g.bytes(info), info);
      if (!decoded) return fail(problems, '4.2', target, `GGUF type ${info.type} has no decoder here`);
      const dtype = ['F16', 'BF16'].includes(info.type) ? info.type : 'F32';
      let bits = decoded;
      if (perm) {
        bits = new Uint32Array(decoded.length);
        const dIn = target.dIn;
        for (let i = 0; i < target.dOut; i++) bits.set(decoded.subarray(i * dIn, (i + 1) * dIn), perm[i] * dIn);
      }
      return { dtype, bits };
    },
  };
}

// Section 15.2: the binary32 decoding of a GGUF tensor, as bits; null for a type not decoded here.
function decodeGguf(buf, info) {
  const n = Number(info.numel);
  const out = new Float32Array(n);
  const bitsOut = new Uint32Array(out.buffer);
  const h16 = (o) => bitsToF32(f16ToF32Bits(buf.readUInt16LE(o)));
  const fr = Math.fround;
  const T = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
  const nib = (qs, i) => (i < 16 ? buf[qs + i] & 0x0f : buf[qs + i - 16] >> 4);
  const nb = n / info.bs;
  switch (info.type) {
    case 'F32': for (let e = 0; e < n; e++) bitsOut[e] = buf.readUInt32LE(4 * e); return bitsOut;
    case 'F16': for (let e = 0; e < n; e++) bitsOut[e] = f16ToF32Bits(buf.readUInt16LE(2 * e)); return bitsOut;
    case 'BF16': for (let e = 0; e < n; e++) bitsOut[e] = bf16ToF32Bits(buf.readUInt16LE(2 * e)); return bitsOut;
    case 'Q8_0': for (let b = 0; b < nb; b++) { const o = b * 34, d = h16(o); for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * buf.readInt8(o + 2 + i)); } return bitsOut;
    case 'Q4_0': for (let b = 0; b < nb; b++) { const o = b * 18, d = h16(o); for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * (nib(o + 2, i) - 8)); } return bitsOut;
    case 'Q4_1': for (let b = 0; b < nb; b++) { const o = b * 20, d = h16(o), m = h16(o + 2); for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * nib(o + 4, i) + m); } return bitsOut;
    case 'Q5_0': for (let b = 0; b < nb; b++) {
      const o = b * 22, d = h16(o), qh = buf.readUInt32LE(o + 2);
      for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * ((nib(o + 6, i) | (((qh >>> i) & 1) << 4)) - 16));
    } return bitsOut;
    case 'Q5_1': for (let b = 0; b < nb; b++) {
      const o = b * 24, d = h16(o), m = h16(o + 2), qh = buf.readUInt32LE(o + 4);
      for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * (nib(o + 8, i) | (((qh >>> i) & 1) << 4)) + m);
    } return bitsOut;
    case 'Q4_K': case 'Q5_K': for (let b = 0; b < nb; b++) {
      const five = info.type === 'Q5_K';
      const o = b * info.bb, d = h16(o), dmin = h16(o + 2), sc = o + 4, qh = o + 16, qs = five ? o + 48 : o + 16;
      const S = [], M = [];
      for (let j = 0; j < 4; j++) {
        const a = buf[sc + j], bb = buf[sc + 4 + j], c = buf[sc + 8 + j];
        S[j] = a & 63; M[j] = bb & 63; S[4 + j] = (c & 15) | ((a >> 6) << 4); M[4 + j] = (c >> 4) | ((bb >> 6) << 4);
      }
      for (let gi = 0; gi < 4; gi++) for (let hh = 0; hh < 2; hh++) for (let l = 0; l < 32; l++) {
        const s = 2 * gi + hh;
        let q = (buf[qs + 32 * gi + l] >> (4 * hh)) & 15;
        if (five) q |= ((buf[qh + l] >> (2 * gi + hh)) & 1) << 4;
        const D = fr(d * S[s]), Nn = -fr(dmin * M[s]);
        out[b * 256 + 64 * gi + 32 * hh + l] = fr(D * q + Nn);
      }
    } return bitsOut;
    case 'Q6_K': for (let b = 0; b < nb; b++) {
      const o = b * 210, ql = o, qh = o + 128, scl = o + 192, d = h16(o + 208);
      for (let c = 0; c < 8; c++) for (let l = 0; l < 32; l++) {
        const v = 32 * c + l, half = c >> 2;
        const lo = (buf[ql + 64 * half + 32 * (c & 1) + l] >> (4 * ((c >> 1) & 1))) & 15;
        const hi = (buf[qh + 32 * half + l] >> (2 * (c & 3))) & 3;
        const D = fr(d * buf.readInt8(scl + (v >> 4)));
        out[b * 256 + v] = fr(D * ((lo | (hi << 4)) - 32));   // no minimum: a zero level keeps D_s's sign (15.2)
      }
    } return bitsOut;
    case 'Q2_K': for (let b = 0; b < nb; b++) {   // scales (16: sc low nibble, mn high), qs (64), d, dmin (15.2)
      const o = b * 84, qs = o + 16, d = h16(o + 80), dmin = h16(o + 82);
      for (let v = 0; v < 256; v++) {
        const half = v >> 7, j = (v >> 5) & 3, l = v & 31, s = v >> 4;
        const n2 = (buf[qs + 32 * half + l] >> (2 * j)) & 3;
        const D = fr(d * (buf[o + s] & 15)), M = fr(dmin * (buf[o + s] >> 4));
        out[b * 256 + v] = fr(fr(D * n2) - M);   // one rounding: the subtraction; -0.0 - +0.0 stays -0.0
      }
    } return bitsOut;
    case 'Q3_K': for (let b = 0; b < nb; b++) {
      const o = b * 110, hm = o, qs = o + 32, sc = o + 96, d = h16(o + 108);
      for (let v = 0; v < 256; v++) {
        const half = v >> 7, j = (v >> 5) & 3, l = v & 31;
        const lo = (buf[qs + 32 * half + l] >> (2 * j)) & 3;
        const hb = (buf[hm + l] >> (v >> 5)) & 1;
        const s = v >> 4;
        const scv = ((buf[sc + (s % 8)] >> (4 * (s >> 3))) & 15) | (((buf[sc + 8 + (s % 4)] >> (2 * (s >> 2))) & 3) << 4);
        out[b * 256 + v] = fr(fr(d * (scv - 32)) * ((lo | (hb << 2)) - 4));
      }
    } return bitsOut;
    case 'IQ4_XS': for (let b = 0; b < nb; b++) {
      const o = b * 136, d = h16(o), sh = buf.readUInt16LE(o + 2), sl = o + 4, qs = o + 8;
      for (let s = 0; s < 8; s++) {
        const scv = ((buf[sl + (s >> 1)] >> (4 * (s & 1))) & 15) | (((sh >> (2 * s)) & 3) << 4);
        for (let i = 0; i < 32; i++) out[b * 256 + 32 * s + i] = fr(fr(d * (scv - 32)) * T[nib(qs + 16 * s, i)]);
      }
    } return bitsOut;
    case 'IQ4_NL': for (let b = 0; b < nb; b++) { const o = b * 18, d = h16(o); for (let i = 0; i < 32; i++) out[b * 32 + i] = fr(d * T[nib(o + 2, i)]); } return bitsOut;
    default: return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Sections 5 and 6.1: selection and probe hash over canonical binary32 bits.
// ---------------------------------------------------------------------------------------------

function probeHash(bits, t, indices) {
  const h = crypto.createHash('sha256');
  const row = Buffer.alloc(4 * t.k);
  for (let r = 0; r < t.dOut; r++) {
    for (let j = 0; j < t.k; j++) row.writeUInt32LE(bits[r * t.dIn + indices[r * t.k + j]], 4 * j);
    h.update(row);
  }
  return 'sha256:' + h.digest('hex');
}

// Section 5.1: sort columns by (is_nan(s), -s, c), keep k, ascending.
function selectRow(bits, r, dIn, k, reverse) {
  const cols = [];
  for (let c = 0; c < dIn; c++) {
    const x = bitsToF32(bits[r * dIn + c]);
    const s = reverse ? -Math.abs(x) : Math.abs(x);
    cols.push([Number.isNaN(s) ? 1 : 0, Number.isNaN(s) ? 0 : -s, c]);
  }
  cols.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);
  return cols.slice(0, k).map((x) => x[2]).sort((a, b) => a - b);
}

// ---------------------------------------------------------------------------------------------
// Section 7: the validator.
// ---------------------------------------------------------------------------------------------

function validate(adapterPath, basePath = null, checkSelection = false) {
  const a = readAdapter(adapterPath);
  const problems = a.problems;
  const result = () => ({
    problems,
    errors: [...new Set(problems.filter((q) => q.severity === 'error').map((q) => q.rule))].sort(),
    warnings: [...new Set(problems.filter((q) => q.severity === 'warning').map((q) => q.rule))].sort(),
  });
  if (problems.some((q) => q.severity === 'error') || basePath === null) return result();
  let base;
  try { base = openBase(basePath); } catch (e) {
    if (!(e instanceof BaseUnreadable)) throw e;
    return { ...result(), baseUnreadable: { rule: e.rule, message: e.message } };
  }
  try {
    // Section 7: targets in the code point order of their keys (= UTF-8 byte order; not JS's UTF-16 order).
    const ordered = [...a.targets].sort((x, y) => Buffer.compare(Buffer.from(x.name, 'utf8'), Buffer.from(y.name, 'utf8')));
    for (const t of ordered) {
      const got = base.resolve(t, problems);                                     // 4.1 (one tensor, one target), 4.2
      if (!got) continue;
      if (got.dtype !== t.dtype) problems.push(new Problem('4.6', `target ${JSON.stringify(t.name)}: base dtype ${got.dtype}, made on ${t.dtype}`, 'warning', t.name));
      const probe = probeHash(got.bits, t, t.arrays.indices);                    // 4.3
      if (probe !== t.probe) { fail(problems, '4.3', t, `probe ${probe} != recorded ${t.probe}`); continue; }
      const rule = a.doc.selection.rule;                                         // 4.4
      if (checkSelection && (rule === 'magnitude' || rule === 'reverse')) {
        for (let r = 0; r < t.dOut; r++) {
          const want = selectRow(got.bits, r, t.dIn, t.k, rule === 'reverse');
          const have = Array.from(t.arrays.indices.subarray(r * t.k, (r + 1) * t.k));
          if (want.some((c, j) => c !== have[j])) { fail(problems, '4.4', t, `row ${r} is ${have}, ${rule} selection gives ${want}`); break; }
        }
      }
    }
  } catch (e) {
    if (!(e instanceof BaseUnreadable)) throw e;
    return { ...result(), baseUnreadable: { rule: e.rule, message: e.message } };
  }
  const recorded = a.doc.base.structure_hash;                                    // 4.5
  if (recorded !== null && base.kind === 'safetensors' && base.structureHash !== recorded) {
    problems.push(new Problem('4.5', `base structure hash ${base.structureHash} != recorded ${recorded}`, 'warning'));
  }
  return result();
}

// ---------------------------------------------------------------------------------------------
// Section 8: the merge rule add-f32-round-once, into a safetensors base file.
// ---------------------------------------------------------------------------------------------

function merge(basePath, adapters) {
  const onnx = isOnnx(basePath) ? readOnnx(basePath) : null;
  const out = new Map();                                  // name -> {dtype, shape, bytes}
  if (onnx) {                                             // section 15.4: initializers, and each weight decoded (F32)
    for (const [name, t] of onnx.initializers) out.set(name, { ...t, bytes: Buffer.from(t.bytes) });
    for (const [name, nb] of onnx.nbits) out.set(name, { dtype: 'F32', shape: [nb.N, nb.K], bytes: nbitsDecode(out, nb) });
  } else {
    const base = baseFile(basePath);
    for (const [name, t] of base.tensors) out.set(name, { dtype: t.dtype, shape: t.shape, bytes: Buffer.from(base.bytes(t)) });
  }
  // Per base tensor: position -> list of terms in adapter order.
  const acc = new Map();
  for (const { file, scale } of adapters) {
    const a = readAdapter(file);
    const errs = a.problems.filter((q) => q.severity === 'error');
    if (errs.length) throw new Error(`adapter ${file} is invalid: ${errs[0].rule} ${errs[0].message}`);
    const s32 = Math.fround(scale);                       // fl32(s_a): the binary64 scale rounded once
    if (!Number.isFinite(s32)) throw new Error(`scale ${scale} is not finite in binary32`);
    for (const t of a.targets) {
      const bt = out.get(t.name);
      if (!bt || !['F32', 'F16', 'BF16'].includes(bt.dtype)) throw new Error(`base has no mergeable tensor ${t.name}`);
      // Section 8.1: the adapter must be valid for W, so W has the stored shape of the target's layout.
      const stored = t.layout === 'out_in' ? [t.dOut, t.dIn] : [t.dIn, t.dOut];
      if (fmtShape(bt.shape) !== fmtShape(stored)) throw new Error(`${t.name}: base shape ${fmtShape(bt.shape)}, not ${fmtShape(stored)}`);
      if (!acc.has(t.name)) acc.set(t.name, new Map());
      const m = acc.get(t.name), { indices, values } = t.arrays;
      for (let r = 0; r < t.dOut; r++) for (let j = 0; j < t.k; j++) {
        const c = indices[r * t.k + j];
        const p = t.layout === 'out_in' ? r * t.dIn + c : c * t.dOut + r;   // section 4.1 flat offset
        const term = Math.fround(s32 * bitsToF32(values[r * t.k + j]));  // exact product, one rounding
        if (!m.has(p)) m.set(p, []);
        m.get(p).push(term);
      }
    }
  }
  for (const [name, m] of acc) {
    const bt = out.get(name), size = bt.dtype === 'F32' ? 4 : 2;
    for (const [p, terms] of m) {
      const wBits = bt.dtype === 'F32' ? bt.bytes.readUInt32LE(4 * p) : bt.dtype === 'F16' ? f16ToF32Bits(bt.bytes.readUInt16LE(2 * p)) : bf16ToF32Bits(bt.bytes.readUInt16LE(2 * p));
      let a = bitsToF32(wBits);
      for (const t of terms) a = Math.fround(a + t);      // binary64 then binary32: the fl32 sum
      const u = f32ToBits(a);
      if (size === 4) bt.bytes.writeUInt32LE(u, 4 * p);
      else bt.bytes.writeUInt16LE(bt.dtype === 'F16' ? f32BitsToF16(u) : f32BitsToBf16(u), 2 * p);
    }
  }
  if (onnx) {
    for (const [name, nb] of onnx.nbits) {
      if (acc.has(name)) nbitsEncode(out, nb, out.get(name).bytes, acc.get(name));
      out.delete(name);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Section 15.4: ONNX MatMulNBits weights. An ONNX model is a protobuf ModelProto; only what the
// section needs is read: the graph's nodes (inputs, op_type, domain, INT attributes) and its
// initializers (dims, data_type, raw_data).
// ---------------------------------------------------------------------------------------------

const isOnnx = (p) => path.basename(p).toLowerCase().endsWith('.onnx');

// Protobuf wire format: [field number, wire type, value] per field; LEN values are Buffers.
function protoFields(buf) {
  const fields = [];
  let i = 0;
  const varint = () => {
    let v = 0, mul = 1, b;
    do {
      if (i >= buf.length) throw new Error('ONNX: truncated varint');
      b = buf[i++];
      v += (b & 0x7f) * mul;
      mul *= 128;
    } while (b & 0x80);
    return v;
  };
  while (i < buf.length) {
    const key = varint(), field = Math.floor(key / 8), wire = key % 8;
    if (wire === 0) fields.push([field, 0, varint()]);
    else if (wire === 2) {
      const n = varint();
      if (i + n > buf.length) throw new Error('ONNX: field past the end');
      fields.push([field, 2, buf.subarray(i, i + n)]);
      i += n;
    } else if (wire === 5) { fields.push([field, 5, buf.subarray(i, i + 4)]); i += 4; }
    else if (wire === 1) { fields.push([field, 1, buf.subarray(i, i + 8)]); i += 8; }
    else throw new Error(`ONNX: wire type ${wire} not read here`);
  }
  return fields;
}
const protoAll = (fields, f) => fields.filter(([n]) => n === f).map(([, , v]) => v);
const protoOne = (fields, f, dflt) => { const v = protoAll(fields, f); return v.length ? v[v.length - 1] : dflt; };
const protoStr = (v) => (v === undefined ? '' : v.toString('utf8'));

const ONNX_DTYPES = { 1: 'F32', 2: 'U8', 10: 'F16', 16: 'BF16' };

// lenient (validation, section 2.6 case 3): an initializer of another type is kept (a target on it is 4.2, not a
// failure to read the model), and a MatMulNBits weight section 15.4 refuses is kept with its problem.
function readOnnx(p, { lenient = false } = {}) {
  const model = protoFields(fs.readFileSync(p));
  const graph = protoFields(protoOne(model, 7, Buffer.alloc(0)));
  const initializers = new Map();
  for (const raw of protoAll(graph, 5)) {                  // TensorProto
    const t = protoFields(raw);
    const name = protoStr(protoOne(t, 8)), type = protoOne(t, 2, 0);
    const dims = [];
    for (const [f, w, v] of t) {
      if (f !== 1) continue;
      if (w === 0) dims.push(v);
      else for (let k = 0; k < v.length;) {              // packed: varints back to back
        let d = 0, mul = 1, byte;
        do { byte = v[k++]; d += (byte & 0x7f) * mul; mul *= 128; } while (byte & 0x80);
        dims.push(d);
      }
    }
    const data = protoOne(t, 9);
    if (!ONNX_DTYPES[type] || data === undefined || protoOne(t, 13, 0) !== 0) {
      const what = `ONNX initializer ${name}: only F32/F16/BF16/UINT8 tensors with raw_data are read here`;
      if (!lenient) throw new Error(what);
      if (initializers.has(name)) throw new Error(`ONNX: two initializers named ${name}`);
      initializers.set(name, { dtype: `ONNX type ${type}`, shape: dims, bytes: null, problem: what });
      continue;
    }
    if (initializers.has(name)) throw new Error(`ONNX: two initializers named ${name}`);
    initializers.set(name, { dtype: ONNX_DTYPES[type], shape: dims, bytes: data });
  }
  const nodes = onnxNodes(graph);
  const nbits = new Map();
  for (const node of nodes) {
    if (node.inner || node.op !== 'MatMulNBits' || node.domain !== 'com.microsoft') continue;
    const { inputs } = node;
    const [b, scales, zp] = [inputs[1], inputs[2], inputs[3] || null];
    const m = /^(.+)_Q\d+(?:G\d+)?$/s.exec(b);
    const name = m && !initializers.has(m[1]) ? m[1] : b;
    const attrs = node.attrs;
    const nb = { b, scales, zp, name, K: attrs.K, N: attrs.N, bits: attrs.bits ?? 4, block: attrs.block_size };
    nb.nBlocks = Math.ceil(nb.K / nb.block);
    nb.floatZp = zp !== null && initializers.get(zp)?.dtype !== 'U8';
    const refuse = (why) => { if (!lenient) throw new Error(`MatMulNBits ${b}: ${why} (rule 4.2)`); nb.problem ??= why; };
    if (node.nonInt.length) refuse('an attribute that is not INT');
    if (![4, 8].includes(nb.bits) || (nb.floatZp && nb.bits !== 4) || inputs.length > 4 && inputs[4]) refuse('not a weight section 15.4 merges');
    if (![b, scales, ...(zp ? [zp] : [])].every((n) => initializers.get(n)?.bytes)) refuse('B, scales or zero points not read here');
    else if (nb.floatZp && initializers.get(zp).dtype !== initializers.get(scales).dtype) refuse("float zero points not of the scales' type");
    if (nbits.has(name)) { refuse('a weight name two nodes claim'); nbits.get(name).problem ??= 'a weight name two nodes claim'; continue; }
    nbits.set(name, nb);
  }
  return { initializers, nbits, nodes };
}

// NodeProto: op_type, domain, inputs, outputs and attributes (INT as a number, INTS as an array); the nodes of
// subgraphs (an If's branches: GRAPH and GRAPHS attributes) come along, marked inner.
function onnxNodes(graph, inner = false, out = []) {
  for (const raw of protoAll(graph, 1)) {
    const node = protoFields(raw);
    const n = { op: protoStr(protoOne(node, 4)), domain: protoStr(protoOne(node, 7)), inputs: protoAll(node, 1).map(protoStr),
      outputs: protoAll(node, 2).map(protoStr), attrs: {}, nonInt: [], inner };
    out.push(n);
    for (const a of protoAll(node, 5).map(protoFields)) {
      const aname = protoStr(protoOne(a, 1)), type = protoOne(a, 20, 0);
      if (type === 2) n.attrs[aname] = protoOne(a, 3, 0);
      else {
        n.nonInt.push(aname);
        if (type === 7) n.attrs[aname] = protoAll(a, 8).flatMap((v) => (typeof v === 'number' ? [v] : packedVarints(v)));
      }
      for (const g of [...protoAll(a, 6), ...protoAll(a, 11)]) onnxNodes(protoFields(g), true, out);
    }
  }
  return out;
}

function packedVarints(v) {
  const out = [];
  for (let k = 0; k < v.length;) {
    let d = 0, mul = 1, byte;
    do { byte = v[k++]; d += (byte & 0x7f) * mul; mul *= 128; } while (byte & 0x80);
    out.push(d);
  }
  return out;
}

// Section 2.6, case 3: an ONNX model as a base. Each target is found by name, else by its probe hash, among
// the float initializers and MatMulNBits weights (section 15.4), in the orientation the graph uses them; then
// refused as a tied embedding table or an initializer an earlier target holds (4.1), or for its dtype (4.2).
// The exporter-scope and legacy node-name stages (informative) are not implemented: no vector needs them.
const QUANT_OPS = new Set(['MatMulNBits', 'QLinearMatMul', 'MatMulInteger', 'DequantizeLinear', 'QuantizeLinear',
  'DynamicQuantizeLinear', 'QGemm', 'DynamicQuantizeMatMul', 'MatMulIntegerToFloat']);
const FLOATS = ['F32', 'F16', 'BF16'];

function openOnnxBase(p) {
  const o = openRegular(p);
  if (o.error) throw new BaseUnreadable('1.1', `base ${p} ${o.error}`);
  fs.closeSync(o.fd);
  let m;
  try { m = readOnnx(p, { lenient: true }); } catch (e) { throw new BaseUnreadable('1.1', `${p} is no readable ONNX model: ${e.message}`); }
  const { initializers, nbits, nodes } = m;
  const producer = new Map();
  for (const n of nodes) for (const y of n.outputs) producer.set(y, n);
  const readers = (name) => nodes.filter((n) => n.inputs.includes(name));
  // The initializer a node input comes from, and whether through one 2-D Transpose with perm [1, 0].
  const source = (input) => {
    if (initializers.has(input)) return [input, false];
    const t = producer.get(input);
    if (t && t.op === 'Transpose' && initializers.has(t.inputs[0]) && initializers.get(t.inputs[0]).shape.length === 2
      && sameList(t.attrs.perm ?? [1, 0], [1, 0])) return [t.inputs[0], true];
    return [null, false];
  };
  // The readers of an initializer, directly or through a Transpose.
  const uses = (name) => readers(name).flatMap((n) => (n.op === 'Transpose' ? n.outputs.flatMap(readers) : [n]));
  const graphLayout = (name) => {
    const linear = new Set(), gather = new Set();
    for (const n of uses(name)) {
      if (n.op === 'MatMul' || n.op === 'Gemm') {
        const [src, tr] = source(n.inputs[1] ?? '');
        if (src === name) linear.add((tr !== (n.op === 'Gemm' && n.attrs.transB === 1)) ? 'out_in' : 'in_out');
      } else if (n.op === 'Gather') {
        const [src, tr] = source(n.inputs[0] ?? '');
        if (src === name && !tr && (n.attrs.axis ?? 0) === 0) gather.add('out_in');
      }
    }
    for (const s of [linear, gather]) if (s.size === 1) return [...s][0];
    return null;
  };
  const suffixMatch = (a, b) => a === b || a.endsWith('.' + b) || (a.includes('.') && b.endsWith('.' + a));
  const stored = (t, layout) => (layout === 'out_in' ? [t.dOut, t.dIn] : [t.dIn, t.dOut]);
  const canonical = (name, layout, t) => {
    if (nbits.has(name)) return new Uint32Array(nbitsDecode(initializers, nbits.get(name)).buffer.slice(0));
    const init = initializers.get(name);
    return storedToCanonical(widen(init.bytes, init.dtype), { ...t, layout });
  };
  const owners = new Map();
  return {
    kind: 'onnx',
    structureHash: null,
    resolve(t, problems) {
      const canonShape = [t.dOut, t.dIn];
      let names = [...initializers.keys(), ...nbits.keys()].filter((n) => suffixMatch(n, t.name));
      if (names.includes(t.name)) names = [t.name];
      if (names.length > 1) return fail(problems, '4.1', t, `ambiguous: initializers ${names.join(', ')} all match the key`);
      let name, layout;
      if (names.length === 1) {
        name = names[0];
        const nb = nbits.get(name), init = initializers.get(name);
        if (nb && nb.problem) return fail(problems, '4.2', t, `MatMulNBits weight ${name}: ${nb.problem}`);
        if (!nb && !FLOATS.includes(init.dtype)) return fail(problems, '4.2', t, `initializer ${name} is ${init.dtype}, not F32, F16 or BF16`);
        if (!nb && uses(name).some((n) => QUANT_OPS.has(n.op))) return fail(problems, '4.2', t, `initializer ${name} feeds a quantized operator`);
        const shape = nb ? [nb.N, nb.K] : init.shape;
        layout = nb ? 'out_in' : graphLayout(name);
        if (layout === null) {
          const fits = ['out_in', 'in_out'].filter((l) => sameList(shape, stored(t, l)));
          layout = fits.includes(t.layout) ? t.layout : fits[0] ?? null;
        }
        if (layout === null || !sameList(shape, stored(t, layout))) return fail(problems, '4.2', t, `${name} has shape ${fmtShape(shape)}, not ${fmtShape(canonShape)} in either orientation the graph allows`);
      } else {
        const hits = [];
        for (const [n, init] of initializers) {
          if (!FLOATS.includes(init.dtype) || init.shape.length !== 2 || init.dtype !== t.dtype) continue;
          for (const l of ['out_in', 'in_out']) {
            if (sameList(init.shape, stored(t, l)) && probeHash(canonical(n, l, t), t, t.arrays.indices) === t.probe) hits.push([n, l]);
          }
        }
        for (const [n, nb] of nbits) {
          if (!nb.problem && nb.N === t.dOut && nb.K === t.dIn && probeHash(canonical(n, 'out_in', t), t, t.arrays.indices) === t.probe) hits.push([n, 'out_in']);
        }
        if (hits.length !== 1) return fail(problems, '4.1', t, hits.length ? `ambiguous: ${hits.map((h) => h.join(' ')).join(', ')} match the probe hash` : 'no initializer found by name or probe hash');
        [name, layout] = hits[0];
      }
      if (readers(name).some((n) => n.op === 'Gather')) return fail(problems, '4.1', t, `initializer ${name} is also an embedding table (tied weights)`);
      if (owners.has(name)) return fail(problems, '4.1', t, `initializer ${name} is already target ${JSON.stringify(owners.get(name))}'s`);
      owners.set(name, t.name);
      if (nbits.has(name)) return { dtype: 'F32', bits: canonical(name, layout, t) };
      const init = initializers.get(name);
      if (init.dtype !== t.dtype) return fail(problems, '4.2', t, `initializer ${name} is ${init.dtype}, the adapter was made on ${t.dtype}`);
      return { dtype: init.dtype, bits: canonical(name, layout, t) };
    },
  };
}

// One value of an F32/F16/BF16 tensor as binary32 bits.
function widenAt(t, e) {
  if (t.dtype === 'F32') return t.bytes.readUInt32LE(4 * e);
  const h = t.bytes.readUInt16LE(2 * e);
  return t.dtype === 'F16' ? f16ToF32Bits(h) : bf16ToF32Bits(h);
}

// Section 15.4 Values: block j of row n, code q (low bits first); integer zero points give
// fl32(s * (q - z)), float ones fl32(fl32(q * s) - fl32(s * z)).
function nbitsValue(tensors, nb, n, j, q) {
  const blockId = n * nb.nBlocks + j;
  const s = bitsToF32(widenAt(tensors.get(nb.scales), blockId));
  if (nb.floatZp) {
    const z = bitsToF32(widenAt(tensors.get(nb.zp), blockId));
    return Math.fround(Math.fround(q * s) - Math.fround(s * z));
  }
  let z = 1 << (nb.bits - 1);
  if (nb.zp) {
    const row = Math.ceil(nb.nBlocks * nb.bits / 8), zb = tensors.get(nb.zp).bytes;
    z = nb.bits === 8 ? zb[n * row + j] : (zb[n * row + (j >> 1)] >> (4 * (j & 1))) & 15;
  }
  return Math.fround(s * (q - z));
}

function nbitsCode(B, nb, n, c) {
  const j = Math.floor(c / nb.block), i = c % nb.block, at = (n * nb.nBlocks + j) * (nb.block * nb.bits / 8);
  return nb.bits === 8 ? B[at + i] : (B[at + (i >> 1)] >> (4 * (i & 1))) & 15;
}

function nbitsDecode(tensors, nb) {
  const out = Buffer.alloc(4 * nb.N * nb.K), B = tensors.get(nb.b).bytes;
  for (let n = 0; n < nb.N; n++) for (let c = 0; c < nb.K; c++) {
    out.writeUInt32LE(f32ToBits(nbitsValue(tensors, nb, n, Math.floor(c / nb.block), nbitsCode(B, nb, n, c))), 4 * (n * nb.K + c));
  }
  return out;
}

// Section 15.4 Merging, exact case only: each changed value must be some code's value on its block's own
// scale and zero point; that code is written. (The re-encoding search of other blocks is not implemented.)
function nbitsEncode(tensors, nb, merged, positions) {
  const B = tensors.get(nb.b).bytes;
  for (const p of positions.keys()) {
    const n = Math.floor(p / nb.K), c = p % nb.K, j = Math.floor(c / nb.block);
    const want = merged.readUInt32LE(4 * p);
    const code = nbitsCode(B, nb, n, c);
    if (f32ToBits(nbitsValue(tensors, nb, n, j, code)) === want) continue;
    let found = -1;
    for (let q = 0; q < 1 << nb.bits && found < 0; q++) if (f32ToBits(nbitsValue(tensors, nb, n, j, q)) === want) found = q;
    if (found < 0) throw new Error(`${nb.name}: merged value at row ${n}, column ${c} is off its block's grid (re-encoding is not implemented here)`);
    const i = c % nb.block, at = (n * nb.nBlocks + j) * (nb.block * nb.bits / 8);
    if (nb.bits === 8) B[at + i] = found;
    else B[at + (i >> 1)] = (B[at + (i >> 1)] & (i & 1 ? 0x0f : 0xf0)) | (found << (4 * (i & 1)));
  }
}

function compareMerged(merged, expectedPath) {
  const exp = isOnnx(expectedPath) ? { tensors: readOnnx(expectedPath).initializers } : baseFile(expectedPath);
  if (!exp.bytes) exp.bytes = (t) => t.bytes;
  const diffs = [];
  for (const [name, t] of exp.tensors) {
    const m = merged.get(name);
    if (!m) { diffs.push(`${name}: missing from the merge`); continue; }
    if (m.dtype !== t.dtype || fmtShape(m.shape) !== fmtShape(t.shape)) { diffs.push(`${name}: ${m.dtype}${fmtShape(m.shape)} vs ${t.dtype}${fmtShape(t.shape)}`); continue; }
    const eb = exp.bytes(t);
    if (!eb.equals(m.bytes)) {
      const size = DTYPE_SIZE[t.dtype];
      let count = 0, first = -1;
      for (let e = 0; e < eb.length / size; e++) if (!eb.subarray(e * size, (e + 1) * size).equals(m.bytes.subarray(e * size, (e + 1) * size))) { count++; if (first < 0) first = e; }
      diffs.push(`${name}: ${count} elements differ, first at flat ${first}`);
    }
  }
  for (const name of merged.keys()) if (!exp.tensors.has(name)) diffs.push(`${name}: not in the expected file`);
  return diffs;
}

// ---------------------------------------------------------------------------------------------
// Section 12: run the manifest.
// ---------------------------------------------------------------------------------------------

function sameList(a, b) { return a.length === b.length && a.every((x, k) => x === b[k]); }

function runManifest(dir) {
  const manifest = plainJson(parseStrictJson(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')));
  const rel = (p) => path.join(dir, p);
  const rows = [];
  for (const v of manifest.vectors) {
    const e = v.expected;
    const r = validate(rel(v.file), v.base ? rel(v.base) : null, !!v.check_selection);
    let errors = r.errors, valid;
    if (r.baseUnreadable) { errors = [...new Set([...errors, r.baseUnreadable.rule])].sort(); }
    valid = errors.length === 0;
    const agrees = valid === e.valid && sameList(errors, [...e.errors].sort()) && sameList(r.warnings, [...e.warnings].sort())
      && !!r.baseUnreadable === !!e.base_unreadable;
    rows.push({ kind: 'vector', name: v.name, valid, errors, warnings: r.warnings, base_unreadable: !!r.baseUnreadable, agrees,
      messages: [...r.problems.map((q) => `${q.severity} ${q.rule}: ${q.message}`), ...(r.baseUnreadable ? [`base ${r.baseUnreadable.rule}: ${r.baseUnreadable.message}`] : [])] });
  }
  for (const m of manifest.merges) {
    let diffs;
    try {
      const merged = merge(rel(m.base), m.adapters.map((a) => ({ file: rel(a.file), scale: a.scale })));
      diffs = compareMerged(merged, rel(m.expected));
    } catch (e) { diffs = [`merge failed: ${e.message}`]; }
    rows.push({ kind: 'merge', name: m.name, match: diffs.length === 0, agrees: diffs.length === 0, messages: diffs });
  }
  return rows;
}

// Section 11.1: escape control, bidirectional and separator characters before printing.
function printable(s) {
  return String(s).replace(/[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]|[\ud800-\udfff]/gu, (ch) => {
    const c = ch.codePointAt(0);
    if (ch === '\n') return '\\n'; if (ch === '\r') return '\\r'; if (ch === '\t') return '\\t';
    return c < 0x100 ? '\\x' + c.toString(16).padStart(2, '0') : '\\u' + c.toString(16).padStart(4, '0');
  });
}

function main(argv) {
  const args = argv.filter((a) => !a.startsWith('--'));
  const json = argv.includes('--json'), verbose = argv.includes('--verbose');
  if (args.length !== 1) {
    process.stderr.write('usage: node check.mjs <vector-dir> [--json] [--verbose]\n');
    return 2;
  }
  let rows;
  try { rows = runManifest(args[0]); } catch (e) {
    process.stderr.write(`error: ${printable(e.message)}\n`);
    return 2;
  }
  if (json) process.stdout.write(JSON.stringify(rows, null, 1) + '\n');
  else {
    for (const r of rows) {
      const mark = r.agrees ? 'agrees' : 'DISAGREES';
      if (r.kind === 'vector') {
        const verdict = r.valid ? 'valid' : 'invalid';
        process.stdout.write(`${printable(r.name)}\t${verdict}\terrors=${r.errors.join(',') || '-'}\twarnings=${r.warnings.join(',') || '-'}${r.base_unreadable ? '\tbase-unreadable' : ''}\t${mark}\n`);
      } else {
        process.stdout.write(`merge:${printable(r.name)}\t${r.match ? 'bit-exact' : 'MISMATCH'}\t${mark}\n`);
      }
      if (verbose || !r.agrees) for (const msg of r.messages) process.stdout.write(`    ${printable(msg)}\n`);
    }
    const bad = rows.filter((r) => !r.agrees).length;
    process.stdout.write(`${rows.length - bad} of ${rows.length} agree with the manifest\n`);
  }
  return rows.every((r) => r.agrees) ? 0 : 1;
}

process.exitCode = main(process.argv.slice(2));
