# Source on the offline GPU test machine (from the project root) after carrying .gpu-wheels/{base,tile}:
#   install wheels into /tmp/site (once per machine) and put the project and them on PYTHONPATH.
# See ../shared/tools/gpu-wheels.sh (it fetches the wheels on a machine with network).
if ! PYTHONPATH=/tmp/site python3 -c "import tilelang, fla, megatron.core, pydantic" >/dev/null 2>&1; then
  for d in .gpu-wheels/base .gpu-wheels/tile; do
    [ -d "$d" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$d"/*.whl
  done
fi
export PYTHONPATH=$PWD:/tmp/site LD_LIBRARY_PATH=/tmp/site/z3/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
