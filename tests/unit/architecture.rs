//! The layering `src/lib.rs` draws, checked on the code: every `crate::` path in a module names
//! only modules of lower layers, and inside every top-level module the files' imports of each
//! other have no circle. Each checker is also shown a made-up violation it must report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first; a module may name modules of strictly lower layers only (modules
/// of one layer are independent of each other).
const LAYERS: &[&[&str]] = &[
    &["noise", "device", "files", "hub", "keys", "media"],
    &["ops"],
    &["models"],
    &["loading", "prompts"],
    &["schedulers"],
    &["pipelines", "verifiers"],
    &["search"],
    &["config", "output"],
    &["collage", "sweep"],
    &["report"],
    &["run"],
    &["cli"],
    &["rescore"],
    &["bench"],
    // Test-only: the extension points exercised end to end.
    &["extension_tests"],
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

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first segments `code` names after `prefix` (`crate::`, `super::`, `crate::search::`):
/// `prefix a::...` and every first segment of `prefix {a, b::c}`.
fn named_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        // `super::` inside `super::super::` or a longer path is not this file's parent.
        if prefix == "super::" && code[..i].ends_with("::") {
            continue;
        }
        let rest = &code[i + prefix.len()..];
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
            // `super::super::x` names the grandparent's `x`, not a sibling.
            if !name.is_empty() && name != "super" {
                out.insert(name);
            }
        }
    }
    out
}

/// The top-level modules `code` names through `crate::`.
fn named_modules(code: &str) -> BTreeSet<String> {
    named_after(code, "crate::")
}

/// `module -> the modules it names -> the files that name them`.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level import graph, over every file of `src/` but `lib.rs` and `main.rs`.
fn import_graph() -> Graph {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
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
                add_edge(&mut graph, &module, &named, &rel);
            }
        }
    }
    graph
}

fn add_edge(graph: &mut Graph, from: &str, to: &str, file: &str) {
    graph
        .entry(from.to_string())
        .or_default()
        .entry(to.to_string())
        .or_default()
        .insert(file.to_string());
}

/// The graph of one top-level module's files (`src/<module>/<file>.rs`, a sub-folder counting
/// as one file): a file names a sibling through `super::x`, `crate::<module>::x` or a name
/// `mod.rs` re-exports from it (`pub use x::{Name}`). `mod.rs`, the module's face, is not a
/// node: it declares and re-exports its files, and the few items it defines itself (the
/// module's error, its settings) are what its files share.
fn module_graph(module: &str) -> Graph {
    let dir = src().join(module);
    let mut graph = Graph::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return graph;
    };
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let mut all = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut all);
        } else {
            all.push(path);
        }
        let code: String = all
            .iter()
            .map(|p| code_of(&std::fs::read_to_string(p).unwrap()))
            .collect::<Vec<_>>()
            .join("\n");
        files.insert(name, code);
    }
    let root = files.get("mod").cloned().unwrap_or_default();
    // Names mod.rs re-exports, and the file each comes from.
    let mut reexported: BTreeMap<String, String> = BTreeMap::new();
    for line in root.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("pub use ") else {
            continue;
        };
        let from = ident(rest);
        if !files.contains_key(&from) {
            continue;
        }
        let names = match rest.find('{') {
            Some(i) => rest[i + 1..]
                .split(['}', ','])
                .map(ident)
                .collect::<Vec<_>>(),
            None => vec![rest.rsplit("::").next().map(ident).unwrap_or_default()],
        };
        for n in names.into_iter().filter(|n| !n.is_empty()) {
            reexported.insert(n, from.clone());
        }
    }
    let resolve = |name: &str| -> String {
        if files.contains_key(name) {
            name.to_string()
        } else {
            reexported
                .get(name)
                .cloned()
                .unwrap_or_else(|| "mod".to_string())
        }
    };
    for (file, code) in &files {
        let mut named = BTreeSet::new();
        for n in named_after(code, "super::")
            .into_iter()
            .chain(named_after(code, &format!("crate::{module}::")))
        {
            named.insert(resolve(&n));
        }
        for n in named {
            if n != *file && n != "mod" && file != "mod" {
                add_edge(&mut graph, file, &n, file);
            }
        }
    }
    graph
}

/// A cycle of `graph`, if it has one (depth-first search with colours: a grey node met again
/// closes a cycle).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
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
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut colour, &mut Vec::new()))
}

/// The edges of `graph` that go up or sideways in [`LAYERS`].
fn upward_edges(graph: &Graph) -> Vec<String> {
    let mut upward = Vec::new();
    for (module, named) in graph {
        let Some(from) = layer_of(module) else {
            upward.push(format!("{module} has no layer"));
            continue;
        };
        for (target, files) in named {
            match layer_of(target) {
                Some(to) if to < from => {}
                _ => upward.push(format!("{module} -> {target} (in {files:?})")),
            }
        }
    }
    upward
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
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
    let upward = upward_edges(&import_graph());
    assert!(
        upward.is_empty(),
        "imports that go up or sideways:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_module_has_a_circle_among_its_files() {
    let mut modules = Vec::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(modules.len() >= 8, "{modules:?}");
    let mut circles = Vec::new();
    for m in &modules {
        if let Some(cycle) = find_cycle(&module_graph(m)) {
            circles.push(format!("{m}: {}", cycle.join(" -> ")));
        }
    }
    assert!(circles.is_empty(), "circles:\n{}", circles.join("\n"));
}

#[test]
fn the_checkers_see_grouped_and_nested_imports_and_report_what_they_should() {
    let code =
        code_of("use crate::{ops::fused, models};\nlet x = crate::noise::Noise; // crate::bench\n");
    let named = named_modules(&code);
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["models", "noise", "ops"]
    );
    assert_eq!(
        named_after(
            "use super::{queue::RoundQueue, Meter}; super::super::x",
            "super::"
        )
        .into_iter()
        .collect::<Vec<_>>(),
        ["Meter", "queue"]
    );
    // A made-up upward import and a made-up circle are reported.
    let mut g = Graph::new();
    add_edge(&mut g, "models", "pipelines", "models/x.rs");
    add_edge(&mut g, "pipelines", "models", "pipelines/y.rs");
    assert_eq!(upward_edges(&g).len(), 1, "{:?}", upward_edges(&g));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["models".into(), "pipelines".into(), "models".into()])
    );
    let mut acyclic = Graph::new();
    add_edge(&mut acyclic, "a", "b", "");
    add_edge(&mut acyclic, "b", "c", "");
    add_edge(&mut acyclic, "a", "c", "");
    assert_eq!(find_cycle(&acyclic), None);
}
