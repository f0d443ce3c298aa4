# Source on the offline GPU test machine (from the project root) after carrying either
#   .gpu-wheels/site.tar.xz   (scripts/pack_gpu_site.sh: the wheels below installed and xz-packed, one carry), or
#   .gpu-wheels/{base,tile}   (the wheels themselves; ../shared/tools/gpu-wheels.sh fetches them).
# Installs into /tmp/site (once per machine) and puts the project and them on PYTHONPATH.
if ! PYTHONPATH=/tmp/site python3 -c "import tilelang, fla, megatron.core, pydantic" >/dev/null 2>&1; then
  if [ -f .gpu-wheels/site.tar.xz ]; then
    tar -xJf .gpu-wheels/site.tar.xz -C /tmp
  else
    for d in .gpu-wheels/base .gpu-wheels/tile; do
      [ -d "$d" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$d"/*.whl
    done
  fi
fi
export PYTHONPATH=$PWD:/tmp/site LD_LIBRARY_PATH=/tmp/site/z3/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Kernel caches (Triton compiles + fla's autotune results, TileLang builds) live under .gpu-cache/ so a
# later call can carry them back instead of re-tuning (each new fla shape costs ~2 min otherwise).
# `gpu_cache_pack DIR` writes DIR/kcache.tar.xz, or its 15 MiB pieces (IR files dropped: cubins, launchers and autotune
# results are what a cache hit needs); put it (them) in .gpu-data/ here and carry .gpu-data.
# Triton's cache groups hold absolute paths: the checkout must sit at the same path on both machines.
# The pack may come in 15 MiB pieces (kcache.tar.xz.0, .1, ...: the device returns files of 16 MiB at most).
if ls .gpu-data/kcache.tar.xz* >/dev/null 2>&1 && [ ! -d .gpu-cache/triton ]; then
  cat $(ls .gpu-data/kcache.tar.xz* | sort) | tar -xJf - -C "$PWD"
fi
mkdir -p "$PWD/.gpu-cache/triton" "$PWD/.gpu-cache/tilelang" "$PWD/.gpu-cache/inductor"
export TRITON_CACHE_DIR=$PWD/.gpu-cache/triton TILELANG_CACHE_DIR=$PWD/.gpu-cache/tilelang
export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu-cache/inductor  # torch.compile's graphs and kernels
gpu_cache_pack() {
  find "$PWD/.gpu-cache/triton" -type f \( -name '*.llir' -o -name '*.ptx' -o -name '*.ttir' -o -name '*.ttgir' \
    -o -name '*.source' \) -delete
  tar -C "$PWD" -cf - .gpu-cache | xz -T0 -6 > "$1/kcache.tar.xz"
  if [ "$(stat -c %s "$1/kcache.tar.xz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d -a 1 "$1/kcache.tar.xz" "$1/kcache.tar.xz." && rm "$1/kcache.tar.xz"
  fi
  ls -la "$1"/kcache.tar.xz*
}
