"""Feature circuits and their compression into supernodes.

Data flows top to bottom:

    tasks.py       prompt pairs (IOI, subject-verb agreement, digit addition, JSONL) and the
                   logit-difference metric
    attribution.py attribution patching over SAE features and error terms: node effects,
                   edges, exact patching checks
    scoring.py     mean-ablation faithfulness, supernode-level compressed circuits, coherence
    graph.py       Neuronpedia / circuit-tracer graph JSON (read and write) and the picture
    supernodes.py  agglomerative clustering by the semantic W2 distance (and the
                   decoder-cosine baseline), labels, graph compression
    grouping.py    the groupings compared: semantic OT, decoder cosine, attribution
                   profiles (signed in/out edges), random
    curves.py      faithfulness against compression ratio for every grouping
    compression.py CircuitSettings (the callbacks.circuit settings, checked once) and
                   CircuitCompressor: all of it, for train.py and evaluate.py alike
    callback.py    CircuitCompression: the compressor at the end of a train.py run
"""

from saeot.circuits.attribution import (
    ERROR,
    Attribution,
    Edges,
    NodeRef,
    attribute_edges,
    attribute_nodes,
    exact_node_effects,
    select_nodes,
)
from saeot.circuits.curves import curve_counts, plot_supernode_curves, supernode_curves
from saeot.circuits.graph import CircuitGraph, GraphLink, GraphNode, Supernode, load_graph, save_graph
from saeot.circuits.grouping import GROUPINGS, attribution_profiles, cosine_distances, random_partition_distances
from saeot.circuits.supernodes import compress_graph, decoder_cosine_distances, semantic_distances
from saeot.circuits.tasks import (
    DigitAdditionTask,
    IOITask,
    JsonlTask,
    PromptPair,
    PromptsTask,
    SVATask,
    Task,
    TaskData,
    clean_accuracy,
)

__all__ = [
    "ERROR", "Attribution", "Edges", "NodeRef", "attribute_edges", "attribute_nodes", "exact_node_effects",
    "select_nodes", "CircuitGraph", "GraphLink", "GraphNode", "Supernode", "load_graph", "save_graph",
    "compress_graph", "decoder_cosine_distances", "semantic_distances", "DigitAdditionTask", "IOITask",
    "JsonlTask", "PromptPair", "PromptsTask", "SVATask", "Task", "TaskData", "clean_accuracy",
    "GROUPINGS", "attribution_profiles", "cosine_distances", "random_partition_distances",
    "curve_counts", "supernode_curves", "plot_supernode_curves",
]
