#!/usr/bin/env bash
# Pack what training on a bare GPU machine needs and cannot install there into .dev/ (git-ignored;
# the device tool carries it, 64 MiB a call with the working tree): the synthesizers' C libraries and
# data, the text sources and PyAV. scripts/gpu_train.sh unpacks and uses them.
#
# Runs here, after `scripts/setup.sh dev` (which installs espeak-ng, flite and the text packages).
# The target has Python 3.12 with torch, numpy and tokenizers, and no audio libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
LIB=/usr/lib/x86_64-linux-gnu
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p .dev "$stage"/{lib,share/wordnet,share/fortunes,share/dict,espeak-ng-data}

# espeak-ng links libpcaudio for sound-card output, which pulls in PulseAudio, X11 and systemd.
# We synthesize in synchronous mode and never open a device, so a library of no-op symbols stands in.
cat >"$stage/pcaudio.c" <<'EOF'
#include <stddef.h>
void *create_audio_device_object(const char *d, const char *a, const char *b) { return NULL; }
int audio_object_open(void *o, int f, unsigned r, unsigned char c) { return -1; }
void audio_object_close(void *o) {}
void audio_object_destroy(void *o) {}
int audio_object_write(void *o, const void *d, size_t n) { return -1; }
int audio_object_drain(void *o) { return 0; }
int audio_object_flush(void *o) { return 0; }
const char *audio_object_strerror(void *o, int e) { return "no audio output (rawwave synthesis only)"; }
EOF
gcc -shared -fPIC -O2 -Wl,-soname,libpcaudio.so.0 -o "$stage/lib/libpcaudio.so.0" "$stage/pcaudio.c"
cp -L $LIB/{libespeak-ng.so.1,libsonic.so.0,libasound.so.2,libflite.so.1,libflite_usenglish.so.1} "$stage/lib/"
cp -L $LIB/libflite_cmulex.so.1 $LIB/libflite_cmu_us_{kal,kal16,awb,rms,slt}.so.1 "$stage/lib/"

# English only: the other languages' dictionaries are most of espeak-ng-data.
data=$LIB/espeak-ng-data
cp -r $data/{lang,voices,phondata,phonindex,phontab,intonations,en_dict} "$stage/espeak-ng-data/"

# corpus.wordnet_sentences reads only the glosses' quoted examples: keep those glosses alone.
for f in /usr/share/wordnet/data.*; do
  grep -h '|.*"' "$f" | sed 's/^[^|]*|/x |/' >"$stage/share/wordnet/$(basename "$f")" || true
done
find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.*' -exec cp {} "$stage/share/fortunes/" \;
cp /usr/share/dict/american-english "$stage/share/dict/"

tar -C "$stage" -cJf .dev/gpu-bundle.tar.xz lib espeak-ng-data share
# PyAV (resampling, Opus) as its wheel's files, xz-compressed: 24 MB against the wheel's 35.
if [ ! -f .dev/av.tar.xz ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$stage/whl" "av==19.0.2"
  mkdir "$stage/av" && (cd "$stage/av" && python3 -m zipfile -e "$stage"/whl/av-*.whl .)
  tar -C "$stage/av" -cf - . | xz -9 -T0 >.dev/av.tar.xz
fi
du -bc .dev/* | sed 's/^/bundle: /'
