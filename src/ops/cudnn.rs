//! cuDNN's 2-D convolution, loaded at run time.
//!
//! candle's CUDA `conv2d` (built without its `cudnn` feature, as ours is) unfolds the input into
//! a column matrix nine times its size for a 3×3 kernel, runs one GEMM and transposes the result
//! back: three passes over memory where cuDNN's implicit-GEMM kernels make none. Linking cuDNN
//! would make every `--features cuda` binary need it to start, so this module opens
//! `libcudnn.so.9` (or `.8`) with `dlopen` instead, resolves the few functions of cuDNN's
//! convolution API it calls, and reports a typed error where the library is missing; callers
//! then keep candle's convolution.
//!
//! Everything here is host-side: descriptors, the choice of algorithm and the call take device
//! pointers and a stream as plain values (`src/ops/cuda.rs` supplies them from candle's
//! storage), so the loader and the descriptor logic are tested without a GPU.
//!
//! The algorithm for a problem is cuDNN's own heuristic choice (`..._v7`), the first one that
//! is deterministic and fits [`MAX_WORKSPACE`]: a fixed function of the GPU, the cuDNN version
//! and the problem, so the same run gives the same bits (no timing-based search).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The largest workspace (bytes) an algorithm may ask for: 1 GiB.
pub const MAX_WORKSPACE: usize = 1 << 30;

/// The library names tried, in order, when `TT_SCALE_CUDNN_LIB` does not name one.
pub const DEFAULT_NAMES: [&str; 3] = ["libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"];

/// What can go wrong loading or calling cuDNN.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudnnError {
    /// No library could be opened.
    #[error(
        "cuDNN not found (tried {tried}): install cuDNN 8 or 9 (PyTorch's wheels ship it as \
         nvidia-cudnn-cu12/cu13) and put its lib folder on LD_LIBRARY_PATH, or set \
         TT_SCALE_CUDNN_LIB to the file; candle's convolution is used meanwhile"
    )]
    NotFound {
        /// Every name or path tried, with the loader's reason.
        tried: String,
    },
    /// The library opened but lacks a function of the convolution API.
    #[error("{lib} has no {symbol}: not a cuDNN 8 or 9 library; point TT_SCALE_CUDNN_LIB at libcudnn.so.9")]
    MissingSymbol {
        /// The library's path or name.
        lib: String,
        /// The missing function.
        symbol: &'static str,
    },
    /// A cuDNN call returned an error status.
    #[error("cuDNN {call} failed: {message} (status {code})")]
    Status {
        /// The function called.
        call: &'static str,
        /// Its `cudnnStatus_t`.
        code: i32,
        /// `cudnnGetErrorString` of the status.
        message: String,
    },
    /// A convolution cuDNN cannot be asked for (sizes, groups) or has no algorithm for.
    #[error("cuDNN convolution {0}")]
    Problem(String),
}

type Status = c_int;
type Raw = *mut c_void;

/// cuDNN's enum values (cudnn_ops.h / cudnn_cnn.h, the same in cuDNN 8 and 9).
const DATA_FLOAT: c_int = 0;
const DATA_HALF: c_int = 2;
const DATA_BFLOAT16: c_int = 9;
const TENSOR_NCHW: c_int = 0;
const CROSS_CORRELATION: c_int = 1;
const TENSOR_OP_MATH: c_int = 1;
const FMA_MATH: c_int = 3;
const DETERMINISTIC: c_int = 1;
/// Enough entries for every forward algorithm (cuDNN 9 has 8).
const ALGO_SLOTS: usize = 16;

/// `cudnnConvolutionFwdAlgoPerf_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AlgoPerf {
    algo: c_int,
    status: Status,
    time: f32,
    memory: usize,
    determinism: c_int,
    math_type: c_int,
    reserved: [c_int; 3],
}

/// The functions of cuDNN's convolution API this module calls.
struct Api {
    get_version: unsafe extern "C" fn() -> usize,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create: unsafe extern "C" fn(*mut Raw) -> Status,
    destroy: unsafe extern "C" fn(Raw) -> Status,
    set_stream: unsafe extern "C" fn(Raw, Raw) -> Status,
    create_tensor: unsafe extern "C" fn(*mut Raw) -> Status,
    set_tensor_4d: unsafe extern "C" fn(Raw, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    destroy_tensor: unsafe extern "C" fn(Raw) -> Status,
    create_filter: unsafe extern "C" fn(*mut Raw) -> Status,
    set_filter_4d: unsafe extern "C" fn(Raw, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    destroy_filter: unsafe extern "C" fn(Raw) -> Status,
    create_conv: unsafe extern "C" fn(*mut Raw) -> Status,
    #[allow(clippy::type_complexity)]
    set_conv_2d:
        unsafe extern "C" fn(Raw, c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    set_conv_math: unsafe extern "C" fn(Raw, c_int) -> Status,
    set_conv_groups: unsafe extern "C" fn(Raw, c_int) -> Status,
    destroy_conv: unsafe extern "C" fn(Raw) -> Status,
    #[allow(clippy::type_complexity)]
    output_dim: unsafe extern "C" fn(
        Raw,
        Raw,
        Raw,
        *mut c_int,
        *mut c_int,
        *mut c_int,
        *mut c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    get_algorithms:
        unsafe extern "C" fn(Raw, Raw, Raw, Raw, Raw, c_int, *mut c_int, *mut AlgoPerf) -> Status,
    workspace_size: unsafe extern "C" fn(Raw, Raw, Raw, Raw, Raw, c_int, *mut usize) -> Status,
    #[allow(clippy::type_complexity)]
    forward: unsafe extern "C" fn(
        Raw,
        *const c_void,
        Raw,
        *const c_void,
        Raw,
        *const c_void,
        Raw,
        c_int,
        *mut c_void,
        usize,
        *const c_void,
        Raw,
        *mut c_void,
    ) -> Status,
}

/// An opened cuDNN library.
pub struct Cudnn {
    api: Api,
    path: String,
    // Keeps the functions in `api` mapped; dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Cudnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cudnn")
            .field("path", &self.path)
            .field("version", &self.version())
            .finish()
    }
}

impl Cudnn {
    /// Opens the library at `path` (a file, or a name the dynamic loader searches for) and
    /// resolves the convolution API.
    pub fn open(path: &str) -> Result<Self, CudnnError> {
        // SAFETY: loading runs the library's initialisers; cuDNN's only register its
        // sub-libraries.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| CudnnError::NotFound {
            tried: format!("{path}: {e}"),
        })?;
        macro_rules! get {
            ($name:literal) => {{
                // SAFETY: the type is the function's C signature in cudnn_ops.h/cudnn_cnn.h.
                let symbol = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                *symbol.map_err(|_| CudnnError::MissingSymbol {
                    lib: path.to_string(),
                    symbol: $name,
                })?
            }};
        }
        let api = Api {
            get_version: get!("cudnnGetVersion"),
            get_error_string: get!("cudnnGetErrorString"),
            create: get!("cudnnCreate"),
            destroy: get!("cudnnDestroy"),
            set_stream: get!("cudnnSetStream"),
            create_tensor: get!("cudnnCreateTensorDescriptor"),
            set_tensor_4d: get!("cudnnSetTensor4dDescriptor"),
            destroy_tensor: get!("cudnnDestroyTensorDescriptor"),
            create_filter: get!("cudnnCreateFilterDescriptor"),
            set_filter_4d: get!("cudnnSetFilter4dDescriptor"),
            destroy_filter: get!("cudnnDestroyFilterDescriptor"),
            create_conv: get!("cudnnCreateConvolutionDescriptor"),
            set_conv_2d: get!("cudnnSetConvolution2dDescriptor"),
            set_conv_math: get!("cudnnSetConvolutionMathType"),
            set_conv_groups: get!("cudnnSetConvolutionGroupCount"),
            destroy_conv: get!("cudnnDestroyConvolutionDescriptor"),
            output_dim: get!("cudnnGetConvolution2dForwardOutputDim"),
            get_algorithms: get!("cudnnGetConvolutionForwardAlgorithm_v7"),
            workspace_size: get!("cudnnGetConvolutionForwardWorkspaceSize"),
            forward: get!("cudnnConvolutionForward"),
        };
        Ok(Self {
            api,
            path: path.to_string(),
            _lib: lib,
        })
    }

    /// Opens the library `TT_SCALE_CUDNN_LIB` names, else the first of [`DEFAULT_NAMES`] the
    /// dynamic loader finds (on `LD_LIBRARY_PATH` or in its cache).
    pub fn load() -> Result<Self, CudnnError> {
        if let Some(path) = std::env::var_os("TT_SCALE_CUDNN_LIB") {
            return Self::open(&path.to_string_lossy());
        }
        let mut tried = Vec::new();
        for name in DEFAULT_NAMES {
            match Self::open(name) {
                Ok(lib) => return Ok(lib),
                Err(CudnnError::NotFound { tried: why }) => tried.push(why),
                Err(e) => return Err(e),
            }
        }
        Err(CudnnError::NotFound {
            tried: tried.join("; "),
        })
    }

    /// The process's cuDNN, loaded by [`Cudnn::load`] on first use (the outcome is kept).
    pub fn global() -> Result<&'static Cudnn, CudnnError> {
        static LIB: OnceLock<Result<Cudnn, CudnnError>> = OnceLock::new();
        LIB.get_or_init(Self::load).as_ref().map_err(Clone::clone)
    }

    /// The version the library reports (e.g. 92801 for 9.28.1).
    pub fn version(&self) -> usize {
        // SAFETY: no arguments; a pure query.
        unsafe { (self.api.get_version)() }
    }

    /// The path or name the library was opened by.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self, call: &'static str, status: Status) -> Result<(), CudnnError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: cuDNN returns a static string for every status value.
        let message = unsafe {
            let s = (self.api.get_error_string)(status);
            if s.is_null() {
                "unknown status".to_string()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        Err(CudnnError::Status {
            call,
            code: status,
            message,
        })
    }
}

/// The element type of a convolution's tensors; products accumulate in f32 for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvDType {
    /// bfloat16 tensors.
    BF16,
    /// float16 tensors.
    F16,
    /// float32 tensors.
    F32,
}

impl ConvDType {
    /// The math mode asked for: tensor cores for the 16-bit types, FMA for float32 (no TF32
    /// rounding of its inputs, as PyTorch without `allow_tf32`).
    fn math(self) -> c_int {
        match self {
            ConvDType::F32 => FMA_MATH,
            _ => TENSOR_OP_MATH,
        }
    }

    fn raw(self) -> c_int {
        match self {
            ConvDType::BF16 => DATA_BFLOAT16,
            ConvDType::F16 => DATA_HALF,
            ConvDType::F32 => DATA_FLOAT,
        }
    }
}

/// One 2-D convolution (cross-correlation, as PyTorch's): input (n, c, h, w) and filter
/// (k, c / groups, r, s), both contiguous NCHW; output (n, k, out_h, out_w).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvProblem {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height (pixels).
    pub h: usize,
    /// Input width (pixels).
    pub w: usize,
    /// Output channels.
    pub k: usize,
    /// Filter height.
    pub r: usize,
    /// Filter width.
    pub s: usize,
    /// Zero padding on each side, (rows, columns).
    pub padding: (usize, usize),
    /// Stride, (rows, columns).
    pub stride: (usize, usize),
    /// Dilation, (rows, columns).
    pub dilation: (usize, usize),
    /// Channel groups; `c` and `k` are multiples of it.
    pub groups: usize,
    /// Element type of input, filter and output.
    pub dtype: ConvDType,
}

impl ConvProblem {
    /// The output's (height, width), as PyTorch computes them, after checking the problem:
    /// nonzero sizes, groups dividing both channel counts, a dilated filter that fits the padded
    /// input, every size within cuDNN's `int`.
    pub fn output_hw(&self) -> Result<(usize, usize), CudnnError> {
        let bad = |why: String| Err(CudnnError::Problem(format!("{self:?}: {why}")));
        let sizes = [
            self.n,
            self.c,
            self.h,
            self.w,
            self.k,
            self.r,
            self.s,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if sizes.contains(&0) {
            return bad("a size, stride, dilation or group count is zero".into());
        }
        let limit = c_int::MAX as usize;
        if sizes.iter().any(|&v| v > limit)
            || self.padding.0 > limit
            || self.padding.1 > limit
            || self.n.saturating_mul(self.c.max(self.k)) > limit
        {
            return bad("a size exceeds cuDNN's 32-bit range".into());
        }
        if self.c % self.groups != 0 || self.k % self.groups != 0 {
            return bad(format!(
                "{} groups do not divide {} input and {} output channels",
                self.groups, self.c, self.k
            ));
        }
        let out = |len: usize, pad: usize, extent: usize, dil: usize, stride: usize| {
            let span = dil * (extent - 1) + 1;
            (len + 2 * pad)
                .checked_sub(span)
                .map(|room| room / stride + 1)
        };
        match (
            out(
                self.h,
                self.padding.0,
                self.r,
                self.dilation.0,
                self.stride.0,
            ),
            out(
                self.w,
                self.padding.1,
                self.s,
                self.dilation.1,
                self.stride.1,
            ),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => bad("the filter is larger than the padded input".into()),
        }
    }

    /// Elements of the output.
    pub fn output_len(&self) -> Result<usize, CudnnError> {
        let (oh, ow) = self.output_hw()?;
        Ok(self.n * self.k * oh * ow)
    }
}

/// The algorithm chosen for a problem, its math mode and the workspace it needs (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// `cudnnConvolutionFwdAlgo_t`.
    pub algo: i32,
    /// `cudnnMathType_t` the algorithm runs with.
    pub math_type: i32,
    /// Workspace bytes [`Session::forward`] needs.
    pub workspace: usize,
}

/// The four descriptors of one problem, destroyed on drop.
pub struct Descriptors<'a> {
    lib: &'a Cudnn,
    x: Raw,
    w: Raw,
    conv: Raw,
    y: Raw,
}

// SAFETY: descriptors are plain host objects; a `Session` uses them under its owner's lock.
unsafe impl Send for Descriptors<'_> {}

impl Drop for Descriptors<'_> {
    fn drop(&mut self) {
        let api = &self.lib.api;
        // SAFETY: each pointer was created by the matching create call (or is null: skipped).
        unsafe {
            if !self.x.is_null() {
                (api.destroy_tensor)(self.x);
            }
            if !self.y.is_null() {
                (api.destroy_tensor)(self.y);
            }
            if !self.w.is_null() {
                (api.destroy_filter)(self.w);
            }
            if !self.conv.is_null() {
                (api.destroy_conv)(self.conv);
            }
        }
    }
}

impl Cudnn {
    /// The descriptors of `p`, after checking that cuDNN computes the output size we do.
    pub fn descriptors(&self, p: &ConvProblem) -> Result<Descriptors<'_>, CudnnError> {
        let (oh, ow) = p.output_hw()?;
        let api = &self.api;
        let mut d = Descriptors {
            lib: self,
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
        };
        let i = |v: usize| v as c_int; // in range: checked by output_hw
        let dt = p.dtype.raw();
        // SAFETY: each call gets a valid out-pointer or a descriptor created just before.
        unsafe {
            self.check("cudnnCreateTensorDescriptor", (api.create_tensor)(&mut d.x))?;
            self.check("cudnnCreateTensorDescriptor", (api.create_tensor)(&mut d.y))?;
            self.check("cudnnCreateFilterDescriptor", (api.create_filter)(&mut d.w))?;
            self.check(
                "cudnnCreateConvolutionDescriptor",
                (api.create_conv)(&mut d.conv),
            )?;
            self.check(
                "cudnnSetTensor4dDescriptor",
                (api.set_tensor_4d)(d.x, TENSOR_NCHW, dt, i(p.n), i(p.c), i(p.h), i(p.w)),
            )?;
            self.check(
                "cudnnSetFilter4dDescriptor",
                (api.set_filter_4d)(
                    d.w,
                    dt,
                    TENSOR_NCHW,
                    i(p.k),
                    i(p.c / p.groups),
                    i(p.r),
                    i(p.s),
                ),
            )?;
            self.check(
                "cudnnSetConvolution2dDescriptor",
                (api.set_conv_2d)(
                    d.conv,
                    i(p.padding.0),
                    i(p.padding.1),
                    i(p.stride.0),
                    i(p.stride.1),
                    i(p.dilation.0),
                    i(p.dilation.1),
                    CROSS_CORRELATION,
                    DATA_FLOAT,
                ),
            )?;
            self.check(
                "cudnnSetConvolutionGroupCount",
                (api.set_conv_groups)(d.conv, i(p.groups)),
            )?;
            self.check(
                "cudnnSetConvolutionMathType",
                (api.set_conv_math)(d.conv, p.dtype.math()),
            )?;
            let mut dims = [0 as c_int; 4];
            let [dn, dk, dh, dw] = &mut dims;
            self.check(
                "cudnnGetConvolution2dForwardOutputDim",
                (api.output_dim)(d.conv, d.x, d.w, dn, dk, dh, dw),
            )?;
            let ours = [i(p.n), i(p.k), i(oh), i(ow)];
            if dims != ours {
                return Err(CudnnError::Problem(format!(
                    "{p:?}: cuDNN computes an output of {dims:?}, not {ours:?}"
                )));
            }
            self.check(
                "cudnnSetTensor4dDescriptor",
                (api.set_tensor_4d)(d.y, TENSOR_NCHW, dt, i(p.n), i(p.k), i(oh), i(ow)),
            )?;
        }
        Ok(d)
    }
}

/// A cuDNN handle with the plans of the problems it has run: one per GPU, used by one thread at
/// a time (its owner keeps it behind a lock). The handle is created on, and belongs to, the
/// CUDA context current on the creating thread.
pub struct Session {
    lib: &'static Cudnn,
    handle: Raw,
    plans: HashMap<ConvProblem, (Descriptors<'static>, Plan)>,
}

// SAFETY: a cuDNN handle may move between threads; it is only used by one at a time (`&mut`).
unsafe impl Send for Session {}

impl Drop for Session {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by cudnnCreate in `Session::new`.
        unsafe { (self.lib.api.destroy)(self.handle) };
    }
}

impl Session {
    /// A new handle on the current CUDA context (fails with a status error where there is no
    /// GPU or driver).
    pub fn new(lib: &'static Cudnn) -> Result<Self, CudnnError> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        lib.check("cudnnCreate", unsafe { (lib.api.create)(&mut handle) })?;
        Ok(Self {
            lib,
            handle,
            plans: HashMap::new(),
        })
    }

    /// The plan for `p`: cuDNN's heuristic ranking of the forward algorithms, the first that
    /// is supported, deterministic and within [`MAX_WORKSPACE`]; chosen once per problem.
    pub fn plan(&mut self, p: &ConvProblem) -> Result<Plan, CudnnError> {
        if let Some((_, plan)) = self.plans.get(p) {
            return Ok(*plan);
        }
        let lib = self.lib;
        let api = &lib.api;
        let d = lib.descriptors(p)?;
        let mut perf = [AlgoPerf::default(); ALGO_SLOTS];
        let mut count: c_int = 0;
        // SAFETY: descriptors of this handle's problem; `perf` holds ALGO_SLOTS entries.
        lib.check("cudnnGetConvolutionForwardAlgorithm_v7", unsafe {
            (api.get_algorithms)(
                self.handle,
                d.x,
                d.w,
                d.conv,
                d.y,
                ALGO_SLOTS as c_int,
                &mut count,
                perf.as_mut_ptr(),
            )
        })?;
        let ranked = &perf[..(count.max(0) as usize).min(ALGO_SLOTS)];
        let mut chosen = None;
        for cand in ranked.iter().filter(|a| {
            a.status == 0 && a.determinism == DETERMINISTIC && a.memory <= MAX_WORKSPACE
        }) {
            // float32 keeps FMA math whatever the ranking's entry says (no TF32).
            let math_type = match p.dtype {
                ConvDType::F32 => FMA_MATH,
                _ => cand.math_type,
            };
            // SAFETY: `d.conv` is this problem's descriptor.
            lib.check("cudnnSetConvolutionMathType", unsafe {
                (api.set_conv_math)(d.conv, math_type)
            })?;
            let mut workspace = 0usize;
            // SAFETY: as above, with a valid out-pointer.
            let status = unsafe {
                (api.workspace_size)(
                    self.handle,
                    d.x,
                    d.w,
                    d.conv,
                    d.y,
                    cand.algo,
                    &mut workspace,
                )
            };
            if status == 0 && workspace <= MAX_WORKSPACE {
                chosen = Some(Plan {
                    algo: cand.algo,
                    math_type,
                    workspace,
                });
                break;
            }
        }
        let plan = chosen.ok_or_else(|| {
            CudnnError::Problem(format!(
                "{p:?}: none of cuDNN's {} ranked algorithms is supported, deterministic and \
                 within a {MAX_WORKSPACE}-byte workspace",
                ranked.len()
            ))
        })?;
        // The descriptors stay with the plan (their math type set to the plan's), so a call
        // sets nothing up again.
        self.plans.insert(*p, (d, plan));
        Ok(plan)
    }

    /// Runs `p` on `stream`: `y = conv(x, w)`, overwriting `y`.
    ///
    /// # Safety
    /// `x`, `w`, `y` are device addresses of contiguous NCHW tensors of `p`'s shapes and dtype
    /// on this session's GPU, `workspace` holds at least the plan's workspace bytes (or is 0 when
    /// it needs none), `stream` is a stream of the same context, and all stay valid until the
    /// stream has run the convolution.
    pub unsafe fn forward(
        &mut self,
        stream: *mut c_void,
        p: &ConvProblem,
        x: u64,
        w: u64,
        y: u64,
        workspace: u64,
    ) -> Result<(), CudnnError> {
        let plan = self.plan(p)?;
        let lib = self.lib;
        let Some((d, _)) = self.plans.get(p) else {
            return Err(CudnnError::Problem(format!("{p:?}: no plan")));
        };
        let (alpha, beta) = (1f32, 0f32);
        lib.check("cudnnSetStream", (lib.api.set_stream)(self.handle, stream))?;
        lib.check(
            "cudnnConvolutionForward",
            (lib.api.forward)(
                self.handle,
                (&alpha as *const f32).cast(),
                d.x,
                x as *const c_void,
                d.w,
                w as *const c_void,
                d.conv,
                plan.algo,
                workspace as *mut c_void,
                plan.workspace,
                (&beta as *const f32).cast(),
                d.y,
                y as *mut c_void,
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> ConvProblem {
        ConvProblem {
            n: 2,
            c: 320,
            h: 128,
            w: 128,
            k: 320,
            r: 3,
            s: 3,
            padding: (1, 1),
            stride: (1, 1),
            dilation: (1, 1),
            groups: 1,
            dtype: ConvDType::BF16,
        }
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        assert_eq!(problem().output_hw().unwrap(), (128, 128));
        let down = ConvProblem {
            stride: (2, 2),
            ..problem()
        };
        assert_eq!(down.output_hw().unwrap(), (64, 64));
        let odd = ConvProblem {
            h: 13,
            w: 11,
            stride: (2, 3),
            dilation: (2, 1),
            padding: (0, 2),
            ..problem()
        };
        // h: (13 - 5) / 2 + 1 = 5; w: (11 + 4 - 3) / 3 + 1 = 5.
        assert_eq!(odd.output_hw().unwrap(), (5, 5));
        assert_eq!(odd.output_len().unwrap(), 2 * 320 * 25);
    }

    #[test]
    fn impossible_problems_are_named_errors() {
        let cases = [
            (ConvProblem { n: 0, ..problem() }, "zero"),
            (
                ConvProblem {
                    groups: 3,
                    ..problem()
                },
                "3 groups do not divide 320",
            ),
            (
                ConvProblem {
                    h: 2,
                    r: 5,
                    padding: (1, 1),
                    ..problem()
                },
                "larger than the padded input",
            ),
            (
                ConvProblem {
                    n: 1 << 31,
                    ..problem()
                },
                "32-bit",
            ),
        ];
        for (p, want) in cases {
            let e = p.output_hw().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_missing_library_is_a_not_found_error_saying_what_to_do() {
        let e = Cudnn::open("/nonexistent/libcudnn.so.9").unwrap_err();
        assert!(matches!(e, CudnnError::NotFound { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/libcudnn.so.9"), "{msg}");
        assert!(msg.contains("TT_SCALE_CUDNN_LIB"), "{msg}");
    }

    #[test]
    fn a_library_that_is_not_cudnn_is_named_with_the_missing_function() {
        let e = Cudnn::open("libc.so.6").unwrap_err();
        match e {
            CudnnError::MissingSymbol { lib, symbol } => {
                assert_eq!(lib, "libc.so.6");
                assert_eq!(symbol, "cudnnGetVersion");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Against a real cuDNN, without a GPU: the library opens, every function resolves, and the
    /// descriptors of SDXL's convolutions give our output sizes; a handle needs a GPU, so its
    /// creation fails with a status error. Run with
    /// `TT_SCALE_CUDNN_LIB=/path/to/libcudnn.so.9 cargo test cudnn -- --ignored`
    /// (the lib from `pip download nvidia-cudnn-cu13`).
    #[test]
    #[ignore = "needs a cuDNN library named by TT_SCALE_CUDNN_LIB"]
    fn a_real_cudnn_describes_the_unet_convolutions() {
        let lib = Cudnn::load().expect("TT_SCALE_CUDNN_LIB names a cuDNN");
        assert!(lib.version() >= 8000, "version {}", lib.version());
        for p in [
            problem(),
            ConvProblem {
                stride: (2, 2),
                dtype: ConvDType::F16,
                ..problem()
            },
            ConvProblem {
                c: 640,
                k: 1280,
                r: 1,
                s: 1,
                padding: (0, 0),
                h: 32,
                w: 32,
                ..problem()
            },
            ConvProblem {
                c: 4,
                groups: 2,
                k: 6,
                h: 7,
                w: 9,
                dtype: ConvDType::F32,
                ..problem()
            },
        ] {
            lib.descriptors(&p).unwrap();
        }
        let lib: &'static Cudnn = Box::leak(Box::new(lib));
        if std::env::var_os("TT_SCALE_CUDNN_EXPECT_GPU").is_none() {
            let e = Session::new(lib).err().expect("no GPU here");
            assert!(matches!(e, CudnnError::Status { .. }), "{e:?}");
        }
    }
}
