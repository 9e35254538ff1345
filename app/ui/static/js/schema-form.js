// Render a method's options from its JSON schema (pydantic's) and validate them the way the API does:
// types, enums, minimum/maximum and their exclusive forms, nullable fields.
import { h } from "./dom.js";

/** Flatten a property schema: resolve $ref, merge anyOf enums, note whether null is allowed. */
export function normalise(prop, root) {
  const resolve = (p) => (p && p.$ref ? root.$defs?.[p.$ref.split("/").pop()] || {} : p || {});
  let p = resolve(prop);
  let nullable = false;
  if (Array.isArray(p.anyOf)) {
    const parts = p.anyOf.map(resolve);
    nullable = parts.some((x) => x.type === "null");
    const real = parts.filter((x) => x.type !== "null");
    const enums = real.flatMap((x) => x.enum || (x.const !== undefined ? [x.const] : []));
    p = { ...(real.length === 1 || !enums.length ? real[0] : { type: "string", enum: enums }), ...omit(p, ["anyOf"]) };
  }
  if (p.const !== undefined && !p.enum) p = { ...p, enum: [p.const] };
  return { ...p, nullable };
}

function omit(obj, keys) {
  return Object.fromEntries(Object.entries(obj).filter(([k]) => !keys.includes(k)));
}

/** Check one value against a normalised property; returns an error sentence or null. */
export function check(p, value) {
  if (value === null) return p.nullable ? null : "a value is required";
  if (p.enum) return p.enum.includes(value) ? null : `must be one of ${p.enum.join(", ")}`;
  if (p.type === "integer" || p.type === "number") {
    if (typeof value !== "number" || Number.isNaN(value)) return "must be a number";
    if (p.type === "integer" && !Number.isInteger(value)) return "must be a whole number";
    if (p.minimum !== undefined && value < p.minimum) return `must be ≥ ${p.minimum}`;
    if (p.maximum !== undefined && value > p.maximum) return `must be ≤ ${p.maximum}`;
    if (p.exclusiveMinimum !== undefined && value <= p.exclusiveMinimum) return `must be > ${p.exclusiveMinimum}`;
    if (p.exclusiveMaximum !== undefined && value >= p.exclusiveMaximum) return `must be < ${p.exclusiveMaximum}`;
  }
  return null;
}

// Long descriptions (a score's variants) stay readable: the first sentence, the rest on demand.
function hintFor(p) {
  const range = rangeHint(p);
  const text = p.description || "";
  if (text.length <= 160) return [text, range].filter(Boolean).join(" · ");
  const cut = text.indexOf(". ") > 0 && text.indexOf(". ") < 160 ? text.indexOf(". ") + 1 : 157;
  return h("span", {}, [text.slice(0, cut), range].filter(Boolean).join(" · "), " ",
    h("details", {}, h("summary", {}, "more"), text.slice(cut).trim()));
}

function rangeHint(p) {
  const parts = [];
  if (p.minimum !== undefined) parts.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) parts.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) parts.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) parts.push(`< ${p.exclusiveMaximum}`);
  if (p.nullable) parts.push("empty = automatic");
  return parts.join(", ");
}

/**
 * Build the option fields for `schema` with ids "opt-<name>"; returns {element, values(), errors}.
 * values() returns only options that differ from their defaults, and per-field errors.
 */
export function optionsForm(schema) {
  const props = Object.entries(schema.properties || {}).map(([name, raw]) => [name, normalise(raw, schema)]);
  const inputs = new Map();
  const fields = props.map(([name, p]) => {
    const id = `opt-${name}`;
    const errId = `err-options.${name}`;
    const hint = hintFor(p);
    let input;
    if (p.type === "boolean" && p.nullable) {
      // A nullable switch has three states (automatic, on, off): a checkbox cannot say "automatic".
      input = h("select", { id, name, "aria-describedby": `${id}-hint ${errId}` },
        [["", "automatic"], ["true", "on"], ["false", "off"]].map(([v, text]) => h("option", { value: v, selected: v === String(p.default ?? "") }, text)));
      inputs.set(name, { p, read: () => (input.value === "" ? null : input.value === "true"), input });
      return h("div", { class: "field", "data-field": `options.${name}` },
        h("label", { for: id }, p.title || name), input,
        h("div", { class: "hint", id: `${id}-hint` }, hint), h("div", { class: "error-text", id: errId }));
    }
    if (p.type === "boolean") {
      input = h("input", { type: "checkbox", id, name, checked: Boolean(p.default), "aria-describedby": `${id}-hint ${errId}` });
      inputs.set(name, { p, read: () => input.checked, input });
      return h("div", { class: "field", "data-field": `options.${name}` },
        h("div", { class: "field inline" }, input, " ", h("label", { for: id }, p.title || name)),
        h("div", { class: "hint", id: `${id}-hint` }, hint), h("div", { class: "error-text", id: errId }));
    }
    if (p.enum) {
      input = h("select", { id, name, "aria-describedby": `${id}-hint ${errId}` },
        p.enum.map((v) => h("option", { value: v, selected: v === p.default }, v)));
      inputs.set(name, { p, read: () => input.value, input });
    } else if (p.type === "integer" || p.type === "number") {
      input = h("input", {
        type: "number", id, name, value: p.default ?? "", inputmode: p.type === "integer" ? "numeric" : "decimal",
        step: p.type === "integer" ? 1 : "any", min: p.minimum, max: p.maximum, "aria-describedby": `${id}-hint ${errId}`,
      });
      inputs.set(name, { p, read: () => (input.value.trim() === "" ? null : Number(input.value)), input });
    } else {
      input = h("input", { type: "text", id, name, value: p.default ?? "", "aria-describedby": `${id}-hint ${errId}` });
      inputs.set(name, { p, read: () => (input.value === "" && p.nullable ? null : input.value), input });
    }
    return h("div", { class: "field", "data-field": `options.${name}` },
      h("label", { for: id }, p.title || name), input,
      h("div", { class: "hint", id: `${id}-hint` }, hint), h("div", { class: "error-text", id: errId }));
  });

  function values() {
    const options = {};
    const errors = {};
    for (const [name, { p, read }] of inputs) {
      const value = read();
      const problem = check(p, value);
      if (problem) errors[`options.${name}`] = problem;
      else if (value !== (p.default ?? null)) options[name] = value;
    }
    return { options, errors };
  }

  return { element: h("div", { class: "fields" }, fields), values };
}
