"""Write the API reference pages (reference/*.md) at build time, one `::: lowrank_fx.<name>` per
name of `lowrank_fx.__all__`, grouped by job. A name no group lists goes to the group "other",
so the reference always covers the whole public API; a group name no longer public is skipped.
"""

import ast
from pathlib import Path

import mkdocs_gen_files

GROUPS = {
    "model": ("Specs, methods and the rewrite", ["Spec", "LoRA", "LoRTA", "RandLoRA", "TrainableTokens", "Method", "Unit",
                                                 "rewrite", "plan", "Plan", "quantize_base", "experts_implementation"]),
    "fold": ("Folding", ["merge", "merged_state_dict", "load_merged", "RequantizeWarning"]),
    "adapters": ("Several adapters", ["set_active_adapters", "active_adapters", "adapters_disabled", "adapter_rows",
                                      "combine_adapters", "delete_adapter"]),
    "files": ("Adapter files and PEFT directories", ["save_adapters", "load_adapters", "save_peft", "load_peft"]),
    "training": ("Training", ["Trainer", "loraplus_optimizer", "loraplus_param_groups", "checkpoint_layers"]),
    "onnx": ("ONNX export and ONNX Runtime", ["export_onnx", "export_onnx_adapter", "OnnxExport", "AdapterSession"]),
    "generation": ("Generation", ["generate", "Generated", "export_generation", "GenerationExport", "GenerationSession"]),
    "errors": ("Errors and warnings", ["LowRankFxError", "SpecError", "CaptureError", "TargetError", "MergeError",
                                       "ModelTypeError", "AdapterFileError", "FileWriteError", "InputError", "ExportError",
                                       "TrainingError", "QuantizedBaseError", "LowRankFxDeprecationWarning"]),
}


def public_names() -> list[str]:
    """`lowrank_fx.__all__`, read from the source without importing torch."""
    tree = ast.parse(Path("lowrank_fx/__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("lowrank_fx/__init__.py defines no __all__")


def main() -> None:
    names = public_names()
    listed = {name for _, group in GROUPS.values() for name in group}
    pages = {slug: (title, [n for n in group if n in names]) for slug, (title, group) in GROUPS.items()}
    other = [n for n in names if n not in listed]
    if other:
        pages["other"] = ("Other names", other)
    index = ["# API reference", "", "Every public name of `lowrank_fx` (`import lowrank_fx as lfx`), from its docstring.", ""]
    for slug, (title, group) in pages.items():
        if not group:
            continue
        index.append(f"- [{title}]({slug}.md): " + ", ".join(f"`{n}`" for n in group))
        with mkdocs_gen_files.open(f"reference/{slug}.md", "w") as page:
            page.write(f"# {title}\n\n" + "\n".join(f"::: lowrank_fx.{n}\n" for n in group))
    with mkdocs_gen_files.open("reference/index.md", "w") as page:
        page.write("\n".join(index) + "\n")


main()
