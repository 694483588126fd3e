// Compiles contracts/*.sol with the pinned solcjs and writes abi/<Name>.json.
// `node contracts/build.mjs` rewrites abi/; `node contracts/build.mjs --check` exits 1 when abi/ is stale;
// `node contracts/build.mjs --standard-json` prints the compiler's standard JSON input with every
// source it read (ours and OpenZeppelin's): what an explorer's "verify" form takes.
// Output is byte-for-byte reproducible: sorted inputs, fixed settings, no timestamps.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const solc = require("solc");
const abiDir = path.join(here, "..", "abi");
const CONTRACTS = ["HokusaiToken", "ModelRegistry", "TokenManager"];

const sources = {};
for (const f of fs.readdirSync(here).filter((f) => f.endsWith(".sol")).sort()) {
  sources[f] = { content: fs.readFileSync(path.join(here, f), "utf8") };
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
const imported = {};
function findImports(p) {
  for (const base of [here, path.join(here, "node_modules")]) {
    const full = path.join(base, p);
    if (fs.existsSync(full)) {
      imported[p] = { content: fs.readFileSync(full, "utf8") };
      return { contents: imported[p].content };
    }
  }
  return { error: `not found: ${p}` };
}
const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
if (process.argv.includes("--standard-json")) {
  const all = { ...input, sources: { ...input.sources } };
  for (const k of Object.keys(imported).sort()) all.sources[k] = imported[k];
  all.settings = { ...input.settings, outputSelection: { "*": { "*": ["abi", "evm.bytecode", "evm.deployedBytecode", "metadata"] } } };
  process.stdout.write(JSON.stringify(all, null, 2) + "\n");
  process.exit(0);
}
const errors = (out.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(2);
}
const check = process.argv.includes("--check");
let stale = [];
fs.mkdirSync(abiDir, { recursive: true });
for (const name of CONTRACTS) {
  const c = out.contracts[`${name}.sol`][name];
  const artifact = {
    contractName: name,
    sourceName: `contracts/${name}.sol`,
    compiler: `solc ${solc.version()}`,
    abi: c.abi,
    bytecode: "0x" + c.evm.bytecode.object,
    deployedBytecode: "0x" + c.evm.deployedBytecode.object,
  };
  const text = JSON.stringify(artifact, null, 2) + "\n";
  const file = path.join(abiDir, `${name}.json`);
  if (check) {
    const old = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
    if (old !== text) stale.push(file);
  } else {
    fs.writeFileSync(file, text);
  }
}
if (check && stale.length) {
  console.error(`abi/ is stale against contracts/ (run \`make abi\`): ${stale.join(", ")}`);
  process.exit(1);
}
console.log(check ? "abi/ is up to date" : `wrote ${CONTRACTS.length} artifacts to abi/`);
