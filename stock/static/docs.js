// The API reference: renders /openapi.json, the service's own description, in the page.
// Only DOM calls and textContent (nothing the document holds is parsed as HTML).
"use strict";

const METHODS = ["get", "put", "post", "patch", "delete"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function resolve(spec, schema, seen) {
  // inline every #/components/schemas/X reference (once per branch: no loops)
  if (Array.isArray(schema)) return schema.map((s) => resolve(spec, s, seen));
  if (!schema || typeof schema !== "object") return schema;
  if (typeof schema.$ref === "string") {
    const name = schema.$ref.split("/").pop();
    if (seen.has(name)) return { $ref: schema.$ref };
    const target = (spec.components && spec.components.schemas || {})[name];
    return resolve(spec, target, new Set([...seen, name]));
  }
  const out = {};
  for (const [key, value] of Object.entries(schema)) out[key] = resolve(spec, value, seen);
  return out;
}

function schemaBlock(spec, schema) {
  return el("pre", {}, JSON.stringify(resolve(spec, schema, new Set()), null, 2));
}

function contentSchema(content) {
  const json = content && (content["application/json"] || Object.values(content)[0]);
  return json && json.schema;
}

function parameters(op) {
  if (!op.parameters || !op.parameters.length) return null;
  const rows = op.parameters.map((p) => el("tr", {},
    el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
    el("td", {}, p.required ? "required" : "optional"),
    el("td", {}, (p.schema && (p.schema.type || "")) + (p.description ? ": " + p.description : ""))));
  return el("div", {}, el("h3", {}, "Parameters"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "in"),
      el("th", {}, ""), el("th", {}, "schema"))), el("tbody", {}, ...rows)));
}

function responses(spec, op) {
  const rows = Object.entries(op.responses || {}).sort().map(([status, answer]) => {
    const schema = contentSchema(answer.content);
    const ref = schema && schema.$ref ? schema.$ref.split("/").pop() : "";
    return el("tr", { "data-test": "response" }, el("td", {}, el("code", {}, status)),
      el("td", {}, answer.description || ""), el("td", {}, ref));
  });
  return el("div", {}, el("h3", {}, "Answers"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "status"),
      el("th", {}, "meaning"), el("th", {}, "body"))), el("tbody", {}, ...rows)));
}

function operation(spec, path, method, op) {
  const admin = (op.security || []).some((s) => "admin" in s);
  const head = el("summary", {},
    el("span", { class: `method m-${method}`, "data-test": "method" }, method.toUpperCase()),
    el("span", { class: "path", "data-test": "path" }, path),
    el("span", { class: "summary" }, op.summary || ""),
    admin ? el("span", { class: "admin", title: "Authorization: Bearer <admin token>" }, "admin") : null);
  const body = op.requestBody && contentSchema(op.requestBody.content);
  const ok = Object.entries(op.responses || {}).find(([status]) => status.startsWith("2"));
  const okSchema = ok && contentSchema(ok[1].content);
  return el("details", { class: "op", "data-test": "operation", "data-op": `${method.toUpperCase()} ${path}` },
    head,
    op.description ? el("p", {}, op.description) : null,
    parameters(op),
    body ? el("div", {}, el("h3", {}, "Request body"), schemaBlock(spec, body)) : null,
    responses(spec, op),
    okSchema ? el("div", {}, el("h3", {}, `Body of ${ok[0]}`), schemaBlock(spec, okSchema)) : null);
}

function group(path) {
  const parts = path.split("/").filter(Boolean);
  if (parts[0] !== "v1") return "service";
  return parts[1] === "admin" ? "admin" : parts[1];
}

function render(spec) {
  const intro = document.getElementById("intro");
  intro.replaceChildren(el("p", {}, `${spec.info.title}, API version ${spec.info.version}: ${spec.info.description || ""}. `,
    "Errors are ", el("code", {}, '{"error": "<code>", "message": "..."}'),
    "; admin routes need ", el("code", {}, "Authorization: Bearer <admin token>"), "."));
  const groups = new Map();
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const method of METHODS) {
      if (!ops[method]) continue;
      const name = group(path);
      if (!groups.has(name)) groups.set(name, []);
      groups.get(name).push(operation(spec, path, method, ops[method]));
    }
  }
  const target = document.getElementById("operations");
  for (const [name, ops] of groups) target.append(el("h2", {}, name), ...ops);
}

async function main() {
  const error = document.getElementById("error");
  try {
    const answer = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
    if (!answer.ok) throw new Error(`/openapi.json answered ${answer.status}`);
    render(await answer.json());
  } catch (exc) {
    error.textContent = `Could not load the API description: ${exc.message}`;
    error.hidden = false;
  }
}

main();
