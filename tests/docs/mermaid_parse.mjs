// Parse Mermaid diagrams with Mermaid's own parser (the version the docs site bundles).
// Input on stdin: a JSON list of diagram sources. Output on stdout: a JSON list, per diagram, of null (it parses)
// or the parser's error message. Run from the repository root after `npm ci`.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!DOCTYPE html><body></body>");
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const source of JSON.parse(input)) {
  try {
    await mermaid.parse(source);
    results.push(null);
  } catch (err) {
    results.push(String(err?.message ?? err));
  }
}
process.stdout.write(JSON.stringify(results));
