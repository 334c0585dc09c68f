"""Where device_map="auto" puts each module: transformers' own placement, reimplemented over a module tree.

`from_pretrained(device_map="auto", quantization_config=BitsAndBytesConfig(load_in_4bit=True))` calls
transformers.integrations.accelerate._get_device_map: get_balanced_memory (each card but the last gets the
model's size / N plus 1.25 x the largest no-split block or leaf; before transformers 5.18 the mean leaf), the bnb quantizer's adjust_max_memory (x 0.90),
then infer_auto_device_map over the module sizes (quantized weights count 0.5 byte per element, everything
else its dtype's size, tied aliases nothing). The functions below follow those (transformers 5.24, accelerate
1.15) step by step on a `Node` tree, without torch; tests/test_estimate_cards.py checks the device maps are equal
to the real functions' on meta models.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

BALANCE_BUFFER = 1.25  # get_balanced_memory: room for the largest block on top of the even share
BNB_MAX_MEMORY = 0.90  # Bnb4BitHfQuantizer.adjust_max_memory


@dataclass
class Node:
    """A module: its direct parameters and buffers as (name, bytes at placement), its children, its class."""

    name: str
    cls: str
    params: list[tuple[str, float]] = field(default_factory=list)
    buffers: list[tuple[str, float]] = field(default_factory=list)
    children: list["Node"] = field(default_factory=list)
    no_split: bool = False  # its class is in the model's _no_split_modules

    def full(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def walk(self) -> Iterator["Node"]:
        yield self
        for c in self.children:
            yield from c.walk()

    def tensors(self, kind: str) -> Iterator[tuple[str, float]]:
        for node in self.walk():
            for local, size in (node.params if kind == "params" else node.buffers):
                yield node.full(local), size


@dataclass(frozen=True)
class Leaf:
    """A parameter or buffer placed on its own (after its module was split)."""

    name: str


def module_sizes(root: Node, tied: set[str], *, only_modules: bool = True) -> tuple[dict, dict]:
    """compute_module_sizes: bytes per module prefix (and per tensor unless only_modules), and per leaf module."""
    sizes: dict[str, float] = defaultdict(int)
    leaves: dict[str, float] = defaultdict(int)
    for name, size in list(root.tensors("params")) + list(root.tensors("buffers")):
        if name in tied:
            continue
        parts = name.split(".")
        for i in range(len(parts)):
            sizes[".".join(parts[:i])] += size
        if "." in name:
            leaves[name.rsplit(".", 1)[0]] += size
        if not only_modules:
            sizes[name] += size
    return sizes, leaves


# transformers 5.18 changed get_balanced_memory's buffer from the mean leaf module to the biggest one (the
# embedding, usually): on Llama-3-8B over 2 cards, 4 decoder layers on card 0 with 5.17, 14 with 5.18+.
BIGGEST_LEAF_SINCE = (5, 18)


def transformers_at_least(release: tuple[int, int], transformers_version: str | None = None) -> bool:
    """Whether this transformers version (None: the installed one, read from its metadata without importing it;
    not installed: assume the newest) is `release` or later."""
    if transformers_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            transformers_version = version("transformers")
        except PackageNotFoundError:
            return True
    parts = []
    for piece in transformers_version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= release


def leaf_rule(transformers_version: str | None = None) -> str:
    """"biggest" or "mean": the balance buffer's leaf term for this transformers version."""
    return "biggest" if transformers_at_least(BIGGEST_LEAF_SINCE, transformers_version) else "mean"


def balanced_memory(root: Node, max_memory: dict, tied: set[str], *, leaf: str = "biggest") -> dict:
    """get_balanced_memory (low_zero False, max_memory given); `leaf` as leaf_rule says."""
    max_memory = dict(max_memory)
    gpus = sorted(k for k, v in max_memory.items() if isinstance(k, int) and v > 0)
    if len(gpus) <= 1:
        return max_memory
    sizes, leaves = module_sizes(root, tied)
    per_gpu = sizes[""] // len(gpus)
    blocks = [sizes[n.name] for n in root.walk() if n.no_split]
    biggest_block = max(blocks) if blocks else 0
    if leaf == "mean":
        leaf_size = int(sum(leaves.values()) / max(len(leaves), 1))
    else:
        leaf_size = max(leaves.values(), default=0)
    per_gpu += int(BALANCE_BUFFER * max(biggest_block, leaf_size))
    for idx in gpus[:-1]:
        max_memory[idx] = min(per_gpu, max_memory[idx])
    return max_memory


def _children(item) -> list:
    return [] if isinstance(item, Leaf) else item.children


def max_layer_size(items: list, sizes: dict) -> tuple[float, list[str]]:
    """get_max_layer_size: the largest module that will not be split (a leaf or a no-split block)."""
    best, names = 0, []
    todo = list(items)
    while todo:
        name, item = todo.pop(0)
        kids = _children(item)
        if not kids or item.no_split:
            size = sizes[name]
            if size > best:
                best, names = size, [name]
            elif size == best:
                names.append(name)
        else:
            todo = [(c.name, c) for c in kids] + todo
    return best, names


def _direct(node: Node, *, buffers: bool = True) -> list:
    """named_parameters(recurse=False) + named_children() (+ named_buffers(recurse=False): only the root's; a
    module split later gives its parameters and children, its own buffers are left out)."""
    return ([(node.full(p), Leaf(node.full(p))) for p, _ in node.params] + [(c.name, c) for c in node.children]
            + ([(node.full(b), Leaf(node.full(b))) for b, _ in node.buffers] if buffers else []))


def _with_ties(tied_params: list[str], size: float, sizes: dict, todo: list) -> tuple[float, list, list]:
    names, items = [], []
    for p in tied_params:
        index = [i for i, (n, _) in enumerate(todo) if p.startswith(n + ".")][0]
        name = todo[index][0]
        if name not in names:
            names.append(name)
            items.append(todo[index][1])
            size += sizes[name]
    return size, names, items


def tied_groups(tied: dict[str, str]) -> list[list[str]]:
    """all_tied_weights_keys (alias -> target) as infer_auto_device_map groups them."""
    if not tied:
        return [[]]
    return [sorted([k for k, v in tied.items() if v == target] + [target]) for target in set(tied.values())]


def infer_device_map(root: Node, max_memory: dict, tied: dict[str, str]) -> dict[str, int | str]:
    """infer_auto_device_map (clean_result, no offload_buffers, no no_placement_params), the same loop."""
    devices = list(max_memory) + ([] if "disk" in max_memory else ["disk"])
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main = [gpus[0], "cpu"] if gpus else ["cpu"]
    sizes, _ = module_sizes(root, set(tied), only_modules=False)
    groups_all = tied_groups(tied)
    todo = _direct(root)
    device_map: dict[str, int | str] = {}
    current = 0
    used = dict.fromkeys(devices, 0)
    biggest, biggest_names = max_layer_size(todo, sizes)
    while todo:
        name, item = todo.pop(0)
        biggest_names = [n for n in biggest_names if n != name and not n.startswith(name + ".")]
        if not biggest_names:
            biggest, biggest_names = max_layer_size([(n, m) for n, m in todo if isinstance(m, Node)], sizes)
        size = sizes[name]
        groups = [g for g in groups_all
                  if any(name + "." in k + "." for k in g) and not all(name + "." in k + "." for k in g)]
        tied_params = sum(([p for p in g if name + "." not in p + "."] for g in groups), [])
        device = devices[current]
        limit = max_memory[device] if device != "disk" else None
        reserved = 0
        if device in main:
            limit, reserved = limit - biggest, biggest
        with_ties, tied_names, tied_items = _with_ties(tied_params, size, sizes, todo)
        if limit is None or used[device] + with_ties <= limit:
            used[device] += with_ties
            device_map[name] = device
            for tname in tied_names:
                if tname in [m[0] for m in todo]:
                    todo.pop(next(i for i, (n, _) in enumerate(todo) if n == tname))
                device_map[tname] = device
            continue
        if tied_params and used[device] + size <= limit:
            split = _split_tied(name, item, tied_names, tied_items, todo)
            if split is not None:
                todo = split
                biggest, biggest_names = max_layer_size([(n, m) for n, m in todo if isinstance(m, Node)], sizes)
                continue
        kids = _children(item)
        if kids and not item.no_split:
            todo = _direct(item, buffers=False) + todo
            biggest, biggest_names = max_layer_size([(n, m) for n, m in todo if isinstance(m, Node)], sizes)
            continue
        used[device] += reserved
        current += 1
        todo = [(name, item)] + todo
    return clean_device_map(device_map)


def _split_tied(name, item, tied_names, tied_items, todo) -> list | None:
    """Split the first tied module that can be split, the module under study first again."""
    for tname, titem in zip(tied_names, tied_items):
        if not _children(titem) or titem.no_split:
            continue
        kids = _direct(titem, buffers=False)
        index = [i for i, (n, _) in enumerate(todo) if n == tname][0]
        return [(name, item)] + todo[:index] + kids + todo[index + 1:]
    return None


def clean_device_map(device_map: dict, module_name: str = "") -> dict:
    """accelerate.utils.modeling.clean_device_map: one entry for a module whose parts share a device."""
    prefix = "" if module_name == "" else f"{module_name}."
    values = [v for k, v in device_map.items() if k.startswith(prefix)]
    if len(set(values)) == 1 and len(values) > 1:
        for k in [k for k in device_map if k.startswith(prefix)]:
            del device_map[k]
        device_map[module_name] = values[0]
    children = [k for k in device_map if k.startswith(prefix) and len(k) > len(module_name)]
    idx = len(module_name.split(".")) + 1 if len(module_name) > 0 else 1
    for child in {".".join(k.split(".")[:idx]) for k in children}:
        clean_device_map(device_map, module_name=child)
    return device_map
