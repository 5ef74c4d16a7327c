# SPDX-License-Identifier: MIT
# samepage build. One entry point: `make` builds build/samepage and the
# library; `make check` runs the tests; `make demo` runs the density demo;
# `make bench` measures and writes bench/results/. Sources are picked up by
# wildcard, so a new file in lib/*/, vmm/, tools/ or tests/ needs no edit here.
#
#   make SAN=1      build with AddressSanitizer + UBSan into build-san/
#   make TSAN=1     build with ThreadSanitizer into build-tsan/

CC      ?= cc
FUZZCC  ?= clang
B       ?= build
ifeq ($(SAN),1)
B       := build-san
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
endif
ifeq ($(TSAN),1)
B       := build-tsan
SANFLAGS := -fsanitize=thread -fno-omit-frame-pointer
endif

PKGS    := libxxhash libbsd-overlay
WARN    := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wvla -Wstrict-prototypes \
           -Wmissing-prototypes -Wno-missing-field-initializers
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -pthread $(WARN) -Iinclude -I. $(SANFLAGS) \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  += $(shell pkg-config --libs libxxhash libbsd 2>/dev/null) -pthread -lm
LDFLAGS += $(SANFLAGS)

LIB_SRC  := $(sort $(wildcard lib/*/*.c))
VMM_SRC  := $(sort $(wildcard vmm/*.c))
TOOL_SRC := $(sort $(filter-out tools/samepaged.c,$(wildcard tools/*.c)))
LIB_OBJ  := $(LIB_SRC:%.c=$(B)/%.o)
VMM_OBJ  := $(VMM_SRC:%.c=$(B)/%.o) $(B)/vmm/guest_blob.o
TOOL_OBJ := $(TOOL_SRC:%.c=$(B)/%.o)
LIB      := $(B)/libsamepage.a

UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
KVM_SRC  := $(sort $(wildcard tests/kvm/test_*.c))
TEST_BIN := $(UNIT_SRC:tests/%.c=$(B)/tests/%) $(KVM_SRC:tests/%.c=$(B)/tests/%)
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=$(B)/fuzz/%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(B)/bench/%)

# The probe guest: freestanding x86-64 code that runs at CPL3 inside the VM.
GUEST_CFLAGS := -std=c11 -O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector \
                -fno-asynchronous-unwind-tables -mno-red-zone -mgeneral-regs-only \
                -fcf-protection=none -fno-builtin -nostdlib -Wall -Wextra -Werror -Iinclude -I.

.PHONY: all deps check check-san check-tsan demo bench fuzz clean tests
all: $(B)/samepage $(LIB)

deps:
	@bash scripts/deps.sh

$(B)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(B)/guest/probe.elf: vmm/guest/probe.c vmm/guest/probe.ld vmm/probe_abi.h
	@mkdir -p $(dir $@)
	$(CC) $(GUEST_CFLAGS) -static -Wl,-T,vmm/guest/probe.ld -Wl,--build-id=none -o $@ vmm/guest/probe.c
$(B)/guest/probe.bin: $(B)/guest/probe.elf
	objcopy -O binary $< $@
$(B)/vmm/guest_blob.o: vmm/guest_blob.S $(B)/guest/probe.bin
	@mkdir -p $(dir $@)
	$(CC) -c -DPROBE_BIN='"$(B)/guest/probe.bin"' $< -o $@

$(B)/samepage: $(TOOL_OBJ) $(VMM_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(TOOL_OBJ) $(VMM_OBJ) $(LIB) $(LDLIBS)

$(B)/tests/%: tests/%.c $(VMM_OBJ) $(LIB) tests/testutil.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(shell pkg-config --cflags check) -Itests -o $@ $< $(VMM_OBJ) $(LIB) \
	      $(LDFLAGS) $(shell pkg-config --libs check) $(LDLIBS)

# bench programs (the merge floor rig) link like the tests
$(B)/bench/%: bench/%.c $(VMM_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(VMM_OBJ) $(LIB) $(LDFLAGS) $(LDLIBS)

tests: $(TEST_BIN) $(B)/samepage $(BENCH_BIN)

$(B)/fuzz/%: tests/fuzz/%.c $(LIB_SRC)
	@mkdir -p $(dir $@)
	$(FUZZCC) -std=c11 -D_GNU_SOURCE -g -O1 -Iinclude -I. -fsanitize=fuzzer,address,undefined \
	      $(shell pkg-config --cflags $(PKGS)) -o $@ $< $(LIB_SRC) $(LDLIBS)

fuzz: $(FUZZ_BIN)

check: deps
	@$(MAKE) --no-print-directory tests fuzz
	@B=$(B) bash tests/run.sh

# The same tests under AddressSanitizer + UBSan, and the merge engine's
# tests (its scanner thread) under ThreadSanitizer. CI runs both after
# `make check`.
check-san: deps
	@$(MAKE) --no-print-directory SAN=1 tests
	@B=build-san bash tests/run.sh

check-tsan: deps
	@$(MAKE) --no-print-directory TSAN=1 build-tsan/tests/unit/test_merge
	@B=build-tsan bash tests/run.sh unit/test_merge

demo: deps
	@$(MAKE) --no-print-directory all
	@B=$(B) bash scripts/demo.sh

bench: deps
	@$(MAKE) --no-print-directory all $(BENCH_BIN)
	@B=$(B) bash bench/run.sh

clean:
	rm -rf build build-san build-tsan

-include $(shell find $(B) -name '*.d' 2>/dev/null)
