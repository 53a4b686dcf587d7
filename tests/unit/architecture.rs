//! The layering `src/lib.rs` draws, checked on the code: every `crate::` path in a module names
//! only modules of lower layers, and the top-level modules' import graph has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first; a module may name modules of strictly lower layers only (modules
/// of one layer are independent of each other).
const LAYERS: &[&[&str]] = &[
    &["noise", "device", "files", "hub"],
    &["ops"],
    &["models"],
    &["loading", "prompts"],
    &["schedulers"],
    &["config"],
    &["pipelines"],
    &["verifiers"],
    &["search"],
    &["output"],
    &["collage", "sweep"],
    &["report"],
    &["run", "cli"],
    &["rescore"],
    &["bench"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (`//` to the end of the line), so that doc links and
/// prose do not count as imports.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names through `crate::`: `crate::a::...` and every first
/// segment of `crate::{a, b::c}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// `module -> the modules it names`, over every file of `src/` but `lib.rs` and `main.rs`.
fn import_graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == "lib.rs" || rel == "main.rs" {
            continue;
        }
        let module = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for named in named_modules(&code) {
            if named != module {
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(named)
                    .or_default()
                    .insert(rel.clone());
            }
        }
    }
    graph
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() > 10, "{declared:?}");
    for m in declared {
        assert!(
            layer_of(m).is_some(),
            "src/lib.rs declares {m}, which has no layer here"
        );
    }
}

#[test]
fn modules_name_only_lower_layers() {
    let mut upward = Vec::new();
    for (module, named) in import_graph() {
        let Some(from) = layer_of(&module) else {
            upward.push(format!("{module} has no layer"));
            continue;
        };
        for (target, files) in named {
            match layer_of(&target) {
                Some(to) if to < from => {}
                _ => upward.push(format!("{module} -> {target} (in {files:?})")),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up or sideways:\n{}",
        upward.join("\n")
    );
}

#[test]
fn ops_and_models_never_name_the_layers_above_pipelines() {
    let forbidden = [
        "pipelines",
        "bench",
        "run",
        "config",
        "verifiers",
        "output",
        "search",
    ];
    for (module, named) in import_graph() {
        if module == "ops" || module == "models" {
            for f in forbidden {
                assert!(
                    !named.contains_key(f),
                    "{module} names crate::{f} in {:?}",
                    named[f]
                );
            }
        }
    }
}

#[test]
fn the_top_level_import_graph_has_no_cycle() {
    let graph = import_graph();
    // Depth-first search with colours: a grey node met again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match colour.get(node) {
            Some(1) => {
                let start = path.iter().position(|p| p == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|n| n.keys()) {
            if let Some(cycle) = visit(next, graph, colour, path) {
                return Some(cycle);
            }
        }
        path.pop();
        colour.insert(node.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut colour, &mut Vec::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_grouped_and_nested_imports() {
    let code =
        code_of("use crate::{ops::fused, models};\nlet x = crate::noise::Noise; // crate::bench\n");
    let named = named_modules(&code);
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["models", "noise", "ops"]
    );
}
