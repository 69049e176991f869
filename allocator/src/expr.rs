//! CEL conditions: compiled once when the policy is loaded, evaluated against values built per
//! score (and per round for the pool).
//!
//! Values are built directly as the interpreter's own types and handed to it by a variable
//! resolver that lends them, so evaluating several rules against one score copies nothing.
//! Only the variables (and the large nested fields) some condition mentions are built at all.

use std::{
    collections::BTreeSet,
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use cel::{
    Context, Env, Program,
    common::{
        types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString},
        value::{CowVal, Val},
    },
    context::VariableResolver,
};

/// The variables a condition can use.
pub const VARIABLES: [&str; 7] = [
    "score",
    "band",
    "entity",
    "deps",
    "dependants",
    "pool",
    "round",
];

/// A compiled condition.
pub(crate) struct Condition {
    program: Program,
    source: String,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// Why a condition does not compile or refers to something that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompileError(pub(crate) String);

impl Condition {
    /// Compiles `source`; refuses references to variables that do not exist.
    pub(crate) fn compile(env: &Env, source: &str) -> Result<Self, CompileError> {
        let program = env
            .compile(source)
            .map_err(|e| CompileError(e.to_string().replace('\n', "; ")))?;
        let refs = program.references();
        let bound = bound_variables(source);
        let mut unknown: Vec<&str> = refs
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v) && !bound.iter().any(|b| b == v))
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            return Err(CompileError(format!(
                "unknown variable(s) {}; conditions can use {}",
                unknown.join(", "),
                VARIABLES.join(", ")
            )));
        }
        Ok(Self {
            program,
            source: source.to_owned(),
        })
    }

    /// The condition's text.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Top-level variables the condition uses.
    pub(crate) fn variables(&self) -> Vec<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Evaluates the condition: `Ok(true)` only for the boolean `true`.
    pub(crate) fn holds(&self, env: &Arc<Env>, vars: &Vars<'_>) -> Result<bool, String> {
        let mut ctx = Context::with_env(env.clone());
        ctx.set_variable_resolver(vars);
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("condition is not a boolean: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Variables bound by comprehension macros (`list.exists(d, ...)`, `all`, `exists_one`, `map`,
/// `filter`): the first argument of each.
fn bound_variables(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for m in ["exists(", "all(", "exists_one(", "map(", "filter("] {
        for (at, _) in source.match_indices(m) {
            if !source[..at].ends_with('.') {
                continue;
            }
            let rest = &source[at + m.len()..];
            if let Some((var, _)) = rest.split_once(',') {
                let var = var.trim();
                if !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push(var.to_owned());
                }
            }
        }
    }
    out
}

/// Identifier-like words in `sources`: which fields some condition may read. A superset (a word
/// in a string literal counts too), so a field left out is certainly unused.
pub(crate) fn words<'s>(sources: impl IntoIterator<Item = &'s str>) -> BTreeSet<String> {
    sources
        .into_iter()
        .flat_map(|s| s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A variable a condition can read (besides `pool`, which is shared by a round).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Var {
    Score,
    Band,
    Entity,
    Deps,
    Dependants,
    Round,
}

/// Builds a variable's value when a condition first reads it.
pub(crate) trait Build<'a>: Sync {
    fn build(&self, var: Var) -> Option<Box<dyn Val + 'a>>;
}

/// The variables of one evaluation, built lazily (a condition that short-circuits on `band`
/// never pays for `entity`) and once (every rule evaluated for the same score shares them).
pub(crate) struct Vars<'a> {
    src: &'a dyn Build<'a>,
    pool: Option<&'a (dyn Val + 'a)>,
    cells: [OnceLock<Option<Box<dyn Val + 'a>>>; 6],
}

impl<'a> Vars<'a> {
    pub(crate) fn new(src: &'a dyn Build<'a>, pool: Option<&'a (dyn Val + 'a)>) -> Self {
        Self {
            src,
            pool,
            cells: Default::default(),
        }
    }
}

impl std::fmt::Debug for Vars<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vars").finish_non_exhaustive()
    }
}

impl VariableResolver for Vars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let var = match variable {
            "pool" => return self.pool.map(CowVal::Borrowed),
            "score" => Var::Score,
            "band" => Var::Band,
            "entity" => Var::Entity,
            "deps" => Var::Deps,
            "dependants" => Var::Dependants,
            "round" => Var::Round,
            _ => return None,
        };
        let v: &'b (dyn Val + 'b) = self.cells[var as usize]
            .get_or_init(|| self.src.build(var))
            .as_deref()?;
        Some(CowVal::Borrowed(v))
    }
}

/// Builds a CEL map field by field.
#[derive(Debug, Default)]
pub(crate) struct Obj<'a>(HashMap<CelMapKey<'a>, Box<dyn Val + 'a>>);

impl<'a> Obj<'a> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(HashMap::with_capacity(n))
    }
    pub(crate) fn num(mut self, k: &'a str, v: f64) -> Self {
        self.0
            .insert(CelMapKey::from(k), Box::new(CelDouble::from(v)));
        self
    }
    pub(crate) fn int(mut self, k: &'a str, v: i64) -> Self {
        self.0.insert(CelMapKey::from(k), Box::new(CelInt::from(v)));
        self
    }
    pub(crate) fn bool(mut self, k: &'a str, v: bool) -> Self {
        self.0
            .insert(CelMapKey::from(k), Box::new(CelBool::from(v)));
        self
    }
    pub(crate) fn str(mut self, k: &'a str, v: &'a str) -> Self {
        self.0
            .insert(CelMapKey::from(k), Box::new(CelString::from(v)));
        self
    }
    pub(crate) fn null(mut self, k: &'a str) -> Self {
        self.0.insert(CelMapKey::from(k), Box::new(CelNull));
        self
    }
    pub(crate) fn val(mut self, k: &'a str, v: Box<dyn Val + 'a>) -> Self {
        self.0.insert(CelMapKey::from(k), v);
        self
    }
    /// A map of numbers keyed by name (signals, observed metrics).
    pub(crate) fn numbers(
        mut self,
        k: &'a str,
        entries: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Self {
        let m: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = entries
            .into_iter()
            .map(|(k, v)| {
                (
                    CelMapKey::from(k),
                    Box::new(CelDouble::from(v)) as Box<dyn Val>,
                )
            })
            .collect();
        self.0.insert(CelMapKey::from(k), Box::new(CelMap::from(m)));
        self
    }
    pub(crate) fn build(self) -> Box<dyn Val + 'a> {
        Box::new(CelMap::from(self.0))
    }
}

/// A CEL list.
pub(crate) fn list<'a>(items: Vec<Box<dyn Val + 'a>>) -> Box<dyn Val + 'a> {
    Box::new(CelList::from(items))
}

/// A CEL string.
pub(crate) fn string<'a>(s: &'a str) -> Box<dyn Val + 'a> {
    Box::new(CelString::from(s))
}

/// The environment conditions are compiled and run in: the standard library.
pub(crate) fn env() -> Arc<Env> {
    Arc::new(Env::stdlib())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A score's probability, a high band and one critical dependency.
    struct Fixed(f64);

    impl<'a> Build<'a> for Fixed {
        fn build(&self, var: Var) -> Option<Box<dyn Val + 'a>> {
            match var {
                Var::Score => Some(
                    Obj::default()
                        .num("probability", self.0)
                        .str("entity", "n1")
                        .build(),
                ),
                Var::Band => Some(string("high")),
                Var::Deps => Some(list(vec![Obj::default().bool("critical", true).build()])),
                _ => None,
            }
        }
    }

    #[test]
    fn conditions_read_lent_values_and_unknown_variables_are_refused() {
        let env = env();
        let c = Condition::compile(
            &env,
            "score.probability >= 0.8 && band == 'high' && size(deps) == 1 && deps[0].critical",
        )
        .unwrap();
        let high = Fixed(0.9);
        let vars = Vars::new(&high, None);
        assert_eq!(c.holds(&env, &vars), Ok(true));
        let low = Fixed(0.1);
        assert_eq!(
            c.holds(&env, &Vars::new(&low, None)),
            Ok(false),
            "short-circuits before band"
        );
        let err = Condition::compile(&env, "scroe.probability > 0.5").unwrap_err();
        assert!(err.0.contains("scroe"), "{err:?}");
        assert!(Condition::compile(&env, "score.probability >").is_err());
        let not_bool = Condition::compile(&env, "score.probability").unwrap();
        assert!(not_bool.holds(&env, &vars).is_err());
        assert!(words(["score.signals['x'] > 0"]).contains("signals"));
        let c = Condition::compile(
            &env,
            "deps.exists(d, d.critical) && deps.all(x, x.risk < 1.0)",
        )
        .unwrap();
        // x.risk is missing: an error (the allocator treats it as not holding), never true.
        assert!(c.holds(&env, &vars).is_err());
        assert!(Condition::compile(&env, "deps.exists(d, e.critical)").is_err());
    }
}
