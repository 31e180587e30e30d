"""``metrics.json`` as results only: what two runs that should agree are compared on."""


def result_numbers(metrics: dict) -> dict:
    """``metrics.json`` flattened to ``path -> value``, without wall-clock times (keys with ``seconds`` or
    ``minutes``) and memory (``resources``: a process's peak RSS is not a result)."""
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if "seconds" not in k and "minutes" not in k and k != "resources":
                    walk(f"{prefix}/{k}", v)
        else:
            out[prefix] = node

    walk("", metrics)
    return out
