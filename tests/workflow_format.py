"""ComfyUI's UI (litegraph) workflow format, as far as this pack's templates need it.

Widget order comes from ``/object_info`` (``input_order``), exactly as the frontend builds
nodes: every widget-type input in order, plus the frontend's extra widgets (the
``control_after_generate`` combo after an INT named seed/noise_seed or flagged so, the upload
button after an image-upload combo). Used by scripts/build_workflows.py to write the
templates and by the tests to validate and retarget them. Pure Python: no ComfyUI import.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The templates are built for the oldest ComfyUI the pack supports; every supported version has its
# own /object_info snapshot (the node types the templates use), recorded from a live server.
MIN_VERSION = "0.3.64"
SUPPORTED_VERSIONS = ("0.3.64", "0.8.0")


def snapshot_path(version: str = MIN_VERSION) -> str:
    return os.path.join(DATA, f"object_info_{version}.json")


SNAPSHOT = snapshot_path()


def load_snapshot(path_or_version: str = SNAPSHOT) -> dict:
    """A stored snapshot, by path or by ComfyUI version ("0.8.0")."""
    path = path_or_version if path_or_version.endswith(".json") else snapshot_path(path_or_version)
    with open(path) as f:
        return json.load(f)


def _inputs(info: dict, node_type: str) -> list[tuple[str, list]]:
    spec = info[node_type]
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    return [(name, spec["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(info: dict, node_type: str) -> list[str]:
    """Names of the values in ``widgets_values``, in order (frontend extras as '<name>:control'
    and '<name>:upload')."""
    slots = []
    for name, spec in _inputs(info, node_type):
        if not is_widget(spec):
            continue
        options = spec[1] if len(spec) > 1 else {}
        slots.append(name)
        if spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
            slots.append(f"{name}:control")
        if options.get("image_upload"):
            slots.append(f"{name}:upload")
    return slots


def default_value(spec: list):
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if spec[0] == "COMBO":
        return (options.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def combo_options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options")
    return None


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    title: str | None = None
    size: tuple[int, int] | None = None


@dataclass
class Note:
    text: str
    pos: tuple[int, int]
    size: tuple[int, int] = (420, 260)


def _socket_type(info, node_type, slot):
    return info[node_type]["output"][slot]


def build(nodes: list[Node], notes: list[Note], info: dict, groups: list[dict] | None = None) -> dict:
    """A UI-format workflow (litegraph 0.4) from node specs."""
    by_id = {n.id: n for n in nodes}
    links, out_links, ui_nodes, names = [], {}, [], {}
    for n in nodes:
        for name, (src, slot) in n.links.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, n.id, None, _socket_type(info, by_id[src].type, slot)])
            out_links.setdefault((src, slot), []).append(link_id)
            names[link_id] = name  # one output may feed several inputs of one node
    for order, n in enumerate(nodes):
        ui_nodes.append(_ui_node(n, order, info, links, out_links, names))
    next_id = max(by_id) + 1
    for i, note in enumerate(notes):
        ui_nodes.append({"id": next_id + i, "type": "Note", "pos": list(note.pos), "size": list(note.size),
                         "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [note.text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": next_id + len(notes) - 1, "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": groups or [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def _ui_node(n: Node, order: int, info: dict, links: list, out_links: dict, names: dict) -> dict:
    if n.type not in info:
        raise KeyError(f"unknown node type {n.type!r}")
    unknown = set(n.widgets) - {name for name, _ in _inputs(info, n.type)}
    if unknown:
        raise KeyError(f"{n.type} has no input {sorted(unknown)}")
    inputs, values = [], []
    for name, spec in _inputs(info, n.type):
        link = next((l for l in links if l[3] == n.id and names[l[0]] == name), None)
        if is_widget(spec):
            values.append(n.widgets.get(name, default_value(spec)))
            options = spec[1] if len(spec) > 1 else {}
            if spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                values.append("fixed")
            if options.get("image_upload"):
                values.append("image")
            if link is None:
                continue
        socket = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                  "link": None if link is None else link[0]}
        if is_widget(spec):
            socket["widget"] = {"name": name}
        if link is not None:
            link[4] = len(inputs)
        inputs.append(socket)
    outputs = [{"name": name, "type": kind, "links": out_links.get((n.id, slot), []), "slot_index": slot}
               for slot, (kind, name) in enumerate(zip(info[n.type]["output"], info[n.type]["output_name"]))]
    height = 60 + 26 * (len(inputs) + len(values))
    node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size or (340, height)), "flags": {},
            "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": n.type}, "widgets_values": values}
    if n.title:
        node["title"] = n.title
    return node


# ---------------------------------------------------------------------------- reading

def widget_value(workflow: dict, node: dict, name: str, info: dict):
    return node["widgets_values"][widget_slots(info, node["type"]).index(name)]


def set_widget(node: dict, name: str, value, info: dict) -> None:
    node["widgets_values"][widget_slots(info, node["type"]).index(name)] = value


def validate(workflow: dict, info: dict, newer: bool = False) -> list[str]:
    """Problems a user would hit when loading/queueing this file: unknown node types, wrong
    widget counts, links between mismatched types. ``newer``: ``info`` is a newer ComfyUI than
    the file was built for, where a stock node may have gained widgets at the end (the frontend
    gives those their defaults); the file's values must then be a prefix of the widgets."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        if n["type"] not in info:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        slots = widget_slots(info, n["type"])
        count = len(n.get("widgets_values", []))
        if count != len(slots) and not (newer and count < len(slots) and not n["type"].startswith("Embroidery")):
            problems.append(f"node {n['id']} ({n['type']}): {len(n.get('widgets_values', []))} widget values, "
                            f"expected {len(slots)} {slots}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: dangling")
            continue
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        socket = nodes[dst]["inputs"][dst_slot]
        if socket.get("link") != link_id:
            problems.append(f"link {link_id}: input {socket['name']} of node {dst} does not point back")
        want = dict(_inputs(info, nodes[dst]["type"]))[socket["name"]][0]
        want = "COMBO" if isinstance(want, list) else want
        if not (out_type == want == kind or "*" in (out_type, want)):
            problems.append(f"link {link_id}: {nodes[src]['type']} gives {out_type}, "
                            f"{nodes[dst]['type']}.{socket['name']} takes {want}")
    return problems
