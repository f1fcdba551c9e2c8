#!/usr/bin/env bash
# Build llama.cpp once: the shared libraries that llama-cpp-python loads and
# upstream's own `llama-server` (the third-party OpenAI-compatible cloud), both
# from the llama.cpp source vendored in the llama-cpp-python sdist, so the
# Python bindings and the libraries always come from the same commit.
#
# Why not `pip install llama-cpp-python`: its default build targets the build
# machine's CPU, and these VMs advertise AMX that they do not allow (SIGSEGV in
# ggml_backend_amx_mul_mat at the first eval). We build for a fixed AVX2 + FMA +
# F16C baseline instead, which runs on any x86-64 machine from 2013 on.
#
# Usage: scripts/build_llamacpp.sh PYTHON
#   Installs llama-cpp-python into PYTHON's environment (bindings only, no
#   second compile) and copies the libraries next to them. The build is kept in
#   $COSTEER_CACHE_DIR/llamacpp-<version> (default ~/.cache/costeer) and reused.
set -euo pipefail

PY=${1:-python}
VERSION=0.3.36
CACHE=${COSTEER_CACHE_DIR:-$HOME/.cache/costeer}
PREFIX=$CACHE/llamacpp-$VERSION
SDIST=$PREFIX/llama_cpp_python-$VERSION.tar.gz

if [ ! -f "$PREFIX/.built" ]; then
    mkdir -p "$PREFIX"
    [ -f "$SDIST" ] || "$PY" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$PREFIX"
    rm -rf "$PREFIX/src" && mkdir -p "$PREFIX/src"
    tar xzf "$SDIST" -C "$PREFIX/src" --strip-components=1
    SRC=$PREFIX/src/vendor/llama.cpp
    ARCH=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
    [ "$(uname -m)" = x86_64 ] || ARCH=()
    cmake -S "$SRC" -B "$PREFIX/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        "${ARCH[@]}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../lib' >"$PREFIX/cmake.log"
    cmake --build "$PREFIX/build" --target llama-server llama --parallel "$(nproc)" >"$PREFIX/build.log"
    mkdir -p "$PREFIX/bin" "$PREFIX/lib"
    cp "$PREFIX/build/bin/llama-server" "$PREFIX/bin/"
    cp -P "$PREFIX"/build/bin/*.so* "$PREFIX/lib/" 2>/dev/null || true
    find "$PREFIX/build" -name '*.so*' \( -type f -o -type l \) -exec cp -P {} "$PREFIX/lib/" \;
    rm -rf "$PREFIX/build" "$PREFIX/src"
    touch "$PREFIX/.built"
fi

# Bindings only (LLAMA_BUILD=OFF: no second compile), then the libraries where
# llama_cpp looks for them first (its package's lib/ folder).
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet "$SDIST"
PKG=$("$PY" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llama_cpp").origin))')
mkdir -p "$PKG/lib"
cp -P "$PREFIX"/lib/*.so* "$PKG/lib/"
echo "llama.cpp $VERSION: bindings in $PKG, server at $PREFIX/bin/llama-server"
