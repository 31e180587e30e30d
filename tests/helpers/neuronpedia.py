"""Neuronpedia's graph schema, as the tests check a written graph against it."""

# Neuronpedia's graph schema (apps/webapp/app/api/graph/graph-schema.json in the Neuronpedia
# repository, draft-07), transcribed: the required keys and the JSON types of every field it types.
_NP_TYPES = {"string": str, "number": (int, float), "integer": int, "array": list, "object": dict,
             "null": type(None)}
NEURONPEDIA_SCHEMA = {
    "required": ["metadata", "qParams", "nodes", "links"],
    "metadata": {"required": ["slug", "scan", "prompt_tokens", "prompt"],
                 "types": {"slug": "string", "scan": "string", "prompt_tokens": "array", "prompt": "string",
                           "feature_details": "object", "node_threshold": "number", "info": "object",
                           "generation_settings": "object", "pruning_settings": "object"}},
    "qParams": {"required": [], "types": {"pinnedIds": "array", "supernodes": "array", "linkType": "string",
                                          "clickedId": "string", "sg_pos": "string"}},
    "nodes": {"required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
              "types": {"node_id": "string", "feature": ["integer", "null"], "layer": ["string", "integer"],
                        "ctx_idx": "integer", "feature_type": "string", "jsNodeId": "string", "clerp": "string",
                        "influence": ["number", "null"], "activation": ["number", "null"]}},
    "links": {"required": ["source", "target", "weight"],
              "types": {"source": "string", "target": "string", "weight": "number"}},
}


def schema_errors(graph: dict) -> list[str]:
    """Every way ``graph`` breaks :data:`NEURONPEDIA_SCHEMA` (empty: valid)."""
    def bad_type(value, spec) -> bool:
        kinds = spec if isinstance(spec, list) else [spec]
        ok = any(isinstance(value, _NP_TYPES[k]) and not (k in ("number", "integer") and isinstance(value, bool))
                 for k in kinds)
        return not ok

    def check(obj, rules, where) -> list[str]:
        if not isinstance(obj, dict):
            return [f"{where} is not an object"]
        errs = [f"{where}.{k} is missing" for k in rules["required"] if k not in obj]
        errs += [f"{where}.{k}={obj[k]!r} is not {t}" for k, t in rules["types"].items() if k in obj and bad_type(obj[k], t)]
        return errs

    errs = [f"{k} is missing" for k in NEURONPEDIA_SCHEMA["required"] if k not in graph]
    errs += check(graph.get("metadata", {}), NEURONPEDIA_SCHEMA["metadata"], "metadata")
    errs += check(graph.get("qParams", {}), NEURONPEDIA_SCHEMA["qParams"], "qParams")
    for key in ("nodes", "links"):
        for i, item in enumerate(graph.get(key, [])):
            errs += check(item, NEURONPEDIA_SCHEMA[key], f"{key}[{i}]")
    return errs
