# Source on a GPU machine before running a binary built with `--features cuda` (the toolchain of
# tools/cuda/setup-cuda-toolchain.sh links the CUDA libraries to stubs): puts that machine's CUDA
# 13 libraries (those that ship with its PyTorch: cuBLAS, cuBLASLt, cuRAND, NVRTC, the runtime)
# and the driver's libcuda.so.1 on LD_LIBRARY_PATH. bench/prepare-gpu-kit.sh packs it into the
# kit, with cuDNN's folder added.
cuda_libs=$(find /opt /usr/local /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -n 1)
driver=$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local -name 'libcuda.so.1' 2>/dev/null | head -n 1)
for lib in "$cuda_libs" "$driver"; do
  if [ -n "$lib" ]; then
    LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
export LD_LIBRARY_PATH
unset cuda_libs driver lib
