# libkeel — one GNU Makefile for the library, tests, examples, benchmarks,
# man pages and installation. `make help` lists the targets.

.DEFAULT_GOAL := all
.SUFFIXES:
.DELETE_ON_ERROR:
.SECONDARY:

# ---- version, from the one header that holds it ----------------------------
vnum = $(shell sed -n 's/^\#define KEEL_VERSION_$(1) \([0-9][0-9]*\).*/\1/p' include/keel/version.h)
VERSION_MAJOR := $(call vnum,MAJOR)
VERSION_MINOR := $(call vnum,MINOR)
VERSION_PATCH := $(call vnum,PATCH)
VERSION := $(VERSION_MAJOR).$(VERSION_MINOR).$(VERSION_PATCH)

# ---- GNU directory variables ------------------------------------------------
PREFIX ?= /usr/local
prefix ?= $(PREFIX)
exec_prefix ?= $(prefix)
libdir ?= $(exec_prefix)/lib
includedir ?= $(prefix)/include
datarootdir ?= $(prefix)/share
mandir ?= $(datarootdir)/man
man3dir ?= $(mandir)/man3
man7dir ?= $(mandir)/man7
pkgconfigdir ?= $(libdir)/pkgconfig
INSTALL ?= install

# ---- tools and flags ----------------------------------------------------------
CC ?= cc
CXX ?= c++
AR ?= ar
PKG_CONFIG ?= pkg-config

# The packages the library links; the .pc names them in Requires.private.
PC_DEPS := hiredis libpq libxxhash libmd
DEP_CFLAGS := $(shell $(PKG_CONFIG) --cflags $(PC_DEPS) 2>/dev/null)
DEP_LIBS := $(shell $(PKG_CONFIG) --libs $(PC_DEPS) 2>/dev/null) -lpthread -lm
CHECK_CFLAGS := $(shell $(PKG_CONFIG) --cflags check 2>/dev/null)
CHECK_LIBS := $(shell $(PKG_CONFIG) --libs check 2>/dev/null)

# Project flags stay apart from the user's CFLAGS/LDFLAGS, which come last
# so that they can override.
OPT ?= -O2
KEEL_WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
	-Wno-missing-field-initializers
KEEL_CFLAGS := -std=c11 $(OPT) -g -fPIC -fvisibility=hidden -pthread -Iinclude $(DEP_CFLAGS)
KEEL_LDFLAGS := -pthread

# SAN=address,undefined or SAN=thread: sanitizer builds in their own folder,
# at the same OPT (the suites run faster at -O2, and still report exactly).
comma := ,
ifneq ($(SAN),)
SAN_FLAGS := -fsanitize=$(SAN) -fno-omit-frame-pointer -fno-sanitize-recover=all
KEEL_CFLAGS += $(SAN_FLAGS)
KEEL_LDFLAGS += $(SAN_FLAGS)
B := build/san-$(subst $(comma),-,$(SAN))
else
B := build
endif

ifeq ($(V),1)
Q :=
say :=
else
Q := @
say = @printf '  %-6s %s\n' $(1) $(2);
endif

# ---- sources, found by wildcard -----------------------------------------------
LIB_SRC := $(sort $(wildcard lib/*.c lib/*/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(B)/obj/%.o)
HEADERS := $(wildcard include/keel/*.h) include/keel.h
TEST_SRC := $(sort $(wildcard tests/test_*.c))
TEST_BIN := $(TEST_SRC:tests/%.c=$(B)/tests/%)
TEST_HELP := $(B)/obj/tests/harness.o
# examples/metrics.c serves HTTP with libmicrohttpd: built when it is there.
HAVE_MHD := $(shell $(PKG_CONFIG) --exists libmicrohttpd 2>/dev/null && echo yes)
EXAMPLE_SRC := $(sort $(filter-out $(if $(HAVE_MHD),,examples/metrics.c),$(wildcard examples/*.c)))
EXAMPLE_BIN := $(EXAMPLE_SRC:examples/%.c=$(B)/examples/%)
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_TARGETS := $(FUZZ_SRC:tests/fuzz/fuzz_%.c=%)
FUZZ_BIN := $(FUZZ_TARGETS:%=$(B)/fuzz/%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(B)/bench/%)
MAN3 := $(wildcard man/man3/*.3)
MAN7 := $(wildcard man/man7/*.7)

# Extra libraries of single programs: LIBS_<program name>.
LIBS_test_ring = $(shell $(PKG_CONFIG) --libs libmemcached 2>/dev/null)
LIBS_ring = $(shell $(PKG_CONFIG) --libs libmemcached 2>/dev/null)
LIBS_metrics = $(shell $(PKG_CONFIG) --libs libmicrohttpd 2>/dev/null)

STATIC := $(B)/libkeel.a
SONAME := libkeel.so.$(VERSION_MAJOR)
SHARED := $(B)/libkeel.so.$(VERSION)

# ---- the library ------------------------------------------------------------
.PHONY: all
all: $(STATIC) $(SHARED) $(B)/libkeel.so $(B)/$(SONAME) $(B)/keel.pc

$(B)/obj/%.o: %.c $(HEADERS) $(wildcard lib/*.h lib/*/*.h) | deps-check
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(KEEL_CFLAGS) $(KEEL_WARN) $(CFLAGS) -Ilib -c $< -o $@

$(STATIC): $(LIB_OBJ)
	$(call say,AR,$@)rm -f $@ && $(AR) rcs $@ $^

$(SHARED): $(LIB_OBJ)
	$(call say,LD,$@)$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--as-needed -Wl,-z,defs \
		$(KEEL_LDFLAGS) $(LDFLAGS) -o $@ $^ $(DEP_LIBS)

$(B)/$(SONAME): $(SHARED)
	$(Q)ln -sf $(notdir $<) $@
$(B)/libkeel.so: $(B)/$(SONAME)
	$(Q)ln -sf $(notdir $<) $@

# Directories under the prefix are written relative to it, so that
# `pkg-config --define-variable=prefix=...` relocates an installed tree.
pcrel = $(patsubst $(prefix),$${prefix},$(patsubst $(prefix)/%,$${prefix}/%,$(1)))
# keel.pc names the install directories, so it is made again when they
# change (`make && make install PREFIX=/opt/x` must not install /usr/local).
PC_VARS := $(prefix)|$(exec_prefix)|$(libdir)|$(includedir)
$(B)/pc-vars: FORCE
	$(Q)mkdir -p $(B) && [ "$$(cat $@ 2>/dev/null)" = '$(PC_VARS)' ] || printf '%s\n' '$(PC_VARS)' > $@
.PHONY: FORCE
FORCE:
$(B)/keel.pc: pkgconfig/keel.pc.in include/keel/version.h Makefile $(B)/pc-vars
	$(call say,GEN,$@)mkdir -p $(B) && sed -e 's|@prefix@|$(prefix)|' \
		-e 's|@exec_prefix@|$(call pcrel,$(exec_prefix))|' \
		-e 's|@libdir@|$(call pcrel,$(libdir))|' -e 's|@includedir@|$(call pcrel,$(includedir))|' \
		-e 's|@VERSION@|$(VERSION)|' $< > $@

# ---- Debian packages --------------------------------------------------------
# `deps` installs what is missing when run as root, else prints the exact
# command and fails. The user-facing targets that need servers or test
# libraries (demo, check, examples, bench) run it first, then themselves
# again in a fresh make, so that pkg-config sees what was just installed.
# A plain build asks pkg-config for the libraries and, when one is
# missing, stops with the command that installs it.
.PHONY: deps deps-check
deps:
	@tools/deps.sh install
deps-check:
	@tools/deps.sh check

# ---- tests --------------------------------------------------------------------
$(B)/obj/tests/%.o: tests/%.c tests/harness.h $(HEADERS) $(wildcard lib/*.h lib/*/*.h)
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(KEEL_CFLAGS) -Wall -Wextra -Werror -Wno-missing-field-initializers \
		$(CHECK_CFLAGS) $(CFLAGS) -Ilib -Itests -c $< -o $@

$(B)/tests/%: $(B)/obj/tests/%.o $(TEST_HELP) $(STATIC)
	@mkdir -p $(dir $@)
	$(call say,LD,$@)$(CC) $(KEEL_LDFLAGS) $(LDFLAGS) -o $@ $(filter %.o,$^) $(STATIC) $(LIBS_$*) \
		$(CHECK_LIBS) $(DEP_LIBS)

# The out-of-memory sweeps share their failing allocator and sweep.
OOM_TESTS := test_oom test_oom_servers
$(OOM_TESTS:%=$(B)/tests/%): $(B)/obj/tests/oom.o
$(OOM_TESTS:%=$(B)/obj/tests/%.o) $(B)/obj/tests/oom.o: tests/oom.h

.PHONY: tests check check-all check-unit check-fuzz check-headers check-symbols check-install check-man
tests: $(TEST_BIN)

# The whole suite: unit and server tests with throwaway servers, and (outside
# sanitizer builds) the header, symbol, man-page and install checks; then
# the fuzz targets, after the suite rather than beside it, so that they do
# not take a core from its timing-sensitive cases.
check: deps
	@$(MAKE) --no-print-directory check-all
ifeq ($(SAN),)
check-all: check-headers check-symbols check-man check-unit check-install
else
check-all: check-unit
endif
	+@$(MAKE) --no-print-directory check-fuzz

check-unit: $(TEST_BIN)
	@SAN='$(SAN)' TESTS='$(TESTS)' tests/servers.sh run tests/run.sh $(TEST_BIN)

# Every public header compiles on its own, as C11 and as C++.
check-headers: $(HEADERS)
	@for h in $(HEADERS); do \
		$(CC) -std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only -Iinclude -x c $$h || exit 1; \
		$(CXX) -std=c++11 -Wall -Wextra -Werror -fsyntax-only -Iinclude -x c++ $$h || exit 1; \
	done; echo "check-headers: $(words $(HEADERS)) headers compile alone as C11 and C++11"

check-symbols: $(SHARED)
	@bad=$$(nm -D --defined-only $< | awk '$$2 ~ /[TDBRVW]/ {print $$3}' | \
		grep -Ev '^(keel_|_init$$|_fini$$|_edata$$|_end$$|__bss_start$$)'); \
	if [ -n "$$bad" ]; then echo "check-symbols: exports without keel_:" $$bad; exit 1; fi; \
	echo "check-symbols: $$(nm -D --defined-only $< | grep -c ' T keel_') functions, all keel_"

# Every function in a public header is named in some man page's NAME line.
check-man:
	@tools/check-man.sh

check-install: all
	+@tests/install.sh

# Under valgrind, with Check's fork disabled so leaks are seen; every suite
# but the out-of-memory sweeps (their failing allocator already frees
# everything it hands out, and a sweep under valgrind takes an hour) and
# test_servers (shell scripts, no library memory).
VALGRIND_BIN := $(filter-out $(OOM_TESTS:%=$(B)/tests/%) $(B)/tests/test_servers,$(TEST_BIN))
.PHONY: check-valgrind
check-valgrind: deps
	@command -v valgrind >/dev/null || { echo "check-valgrind: valgrind is not installed (apt-get install -y valgrind)" >&2; exit 1; }
	@$(MAKE) --no-print-directory tests
	@VALGRIND=1 TESTS='$(TESTS)' tests/servers.sh run tests/run.sh $(VALGRIND_BIN)

# ---- fuzzing --------------------------------------------------------------------
# tests/fuzz/fuzz_<name>.c is a libFuzzer target. check-fuzz links each with
# tests/fuzz/driver.c (any compiler, SAN= honoured) and runs it over
# tests/fuzz/seeds/<name> and FUZZ_RUNS deterministic mutations of them
# (empty: the driver's default). `make fuzz` runs libFuzzer itself, with
# clang, in its own build folder; the sub-make there links without the
# driver (FUZZ_MAIN) and with libFuzzer's main (FUZZ_LDFLAGS).
FUZZ_MAIN := $(B)/obj/tests/fuzz/driver.o
FUZZ_LDFLAGS :=
FUZZ_RUNS ?=
FUZZ_TIME ?= 60
FUZZ_B := build/fuzz-clang

$(B)/obj/tests/fuzz/%.o: tests/fuzz/%.c tests/fuzz/fuzz.h $(HEADERS) $(wildcard lib/*.h lib/*/*.h)
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(KEEL_CFLAGS) $(KEEL_WARN) $(CFLAGS) -Ilib -c $< -o $@

$(B)/fuzz/%: $(B)/obj/tests/fuzz/fuzz_%.o $(FUZZ_MAIN) $(STATIC)
	@mkdir -p $(dir $@)
	$(call say,LD,$@)$(CC) $(KEEL_LDFLAGS) $(FUZZ_LDFLAGS) $(LDFLAGS) -o $@ $^ $(DEP_LIBS)

check-fuzz: $(FUZZ_BIN)
	@for t in $(FUZZ_TARGETS); do \
		$(B)/fuzz/$$t tests/fuzz/seeds/$$t $(FUZZ_RUNS) || { echo "check-fuzz: $$t failed"; exit 1; }; \
	done

.PHONY: fuzz
fuzz:
	@tests/fuzz/libfuzzer.sh check '$(FUZZ)' $(FUZZ_TARGETS)
	+@$(MAKE) --no-print-directory CC=clang SAN=fuzzer-no-link,address,undefined B=$(FUZZ_B) \
		FUZZ_MAIN= FUZZ_LDFLAGS=-fsanitize=fuzzer $(FUZZ_B)/fuzz/$(FUZZ)
	@tests/fuzz/libfuzzer.sh run $(FUZZ) $(FUZZ_TIME) $(FUZZ_B)

# ---- examples ------------------------------------------------------------------
$(B)/examples/%: examples/%.c $(STATIC)
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(KEEL_CFLAGS) -Wall -Wextra -Werror $(CFLAGS) $(KEEL_LDFLAGS) $(LDFLAGS) \
		-o $@ $< $(STATIC) $(LIBS_$*) $(DEP_LIBS)

.PHONY: examples examples-all demo
examples: deps
	@$(MAKE) --no-print-directory examples-all
examples-all: $(EXAMPLE_BIN)

# The example tour, with throwaway servers for the examples that use them.
demo: deps
	@$(MAKE) --no-print-directory examples-all
	@tests/servers.sh run examples/tour.sh $(EXAMPLE_BIN)

# ---- benchmarks ------------------------------------------------------------------
$(B)/bench/%: bench/%.c bench/bench.h $(STATIC)
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(KEEL_CFLAGS) -Wall -Wextra -Werror $(CFLAGS) -Ilib -Ibench $(KEEL_LDFLAGS) \
		$(LDFLAGS) -o $@ $< $(STATIC) $(LIBS_$*) $(DEP_LIBS)

.PHONY: bench bench-all
# SHORT=1 runs each benchmark briefly (CI keeps them working that way).
bench: deps
	@$(MAKE) --no-print-directory bench-all
	@SHORT='$(SHORT)' tests/servers.sh run bench/run.sh $(BENCH_BIN)
bench-all: $(BENCH_BIN)

# ---- install --------------------------------------------------------------------
.PHONY: install uninstall
install: all
	$(INSTALL) -d $(DESTDIR)$(libdir) $(DESTDIR)$(includedir)/keel $(DESTDIR)$(pkgconfigdir) \
		$(DESTDIR)$(man3dir) $(DESTDIR)$(man7dir)
	$(INSTALL) -m 644 $(STATIC) $(DESTDIR)$(libdir)/
	$(INSTALL) -m 755 $(SHARED) $(DESTDIR)$(libdir)/
	ln -sf libkeel.so.$(VERSION) $(DESTDIR)$(libdir)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(libdir)/libkeel.so
	$(INSTALL) -m 644 include/keel.h $(DESTDIR)$(includedir)/
	$(INSTALL) -m 644 $(wildcard include/keel/*.h) $(DESTDIR)$(includedir)/keel/
	$(INSTALL) -m 644 $(B)/keel.pc $(DESTDIR)$(pkgconfigdir)/
	$(INSTALL) -m 644 $(MAN3) $(DESTDIR)$(man3dir)/
	$(INSTALL) -m 644 $(MAN7) $(DESTDIR)$(man7dir)/
	@tools/manlinks.sh list $(MAN3) | while read page name; do \
		printf '.so man3/%s\n' $$page > $(DESTDIR)$(man3dir)/$$name.3; done

uninstall:
	rm -f $(DESTDIR)$(libdir)/libkeel.a $(DESTDIR)$(libdir)/libkeel.so* \
		$(DESTDIR)$(pkgconfigdir)/keel.pc $(DESTDIR)$(includedir)/keel.h
	rm -rf $(DESTDIR)$(includedir)/keel
	@tools/manlinks.sh list $(MAN3) | while read page name; do rm -f $(DESTDIR)$(man3dir)/$$name.3; done
	rm -f $(patsubst man/man3/%,$(DESTDIR)$(man3dir)/%,$(MAN3)) \
		$(patsubst man/man7/%,$(DESTDIR)$(man7dir)/%,$(MAN7))

# ---- housekeeping ------------------------------------------------------------------
.PHONY: clean help
clean:
	rm -rf build

help:
	@echo 'libkeel $(VERSION) — targets:'
	@echo '  all            build/libkeel.a and build/libkeel.so.$(VERSION) (default)'
	@echo '  demo           build and run the example tour (installs missing packages as root)'
	@echo '  check          the whole test suite, with its throwaway servers'
	@echo '  check-unit     only the Check suites (SAN=... runs them sanitized)'
	@echo '  check-headers  every public header alone, as C11 and C++11'
	@echo '  check-symbols  fail on any export of libkeel.so without keel_'
	@echo '  check-man      every public function named in a man page'
	@echo '  check-install  install to a temporary DESTDIR, link an outside program with pkg-config'
	@echo '  check-valgrind the Check suites under valgrind'
	@echo '  check-fuzz     the fuzz targets over their seeds and mutations (part of check)'
	@echo '  fuzz           libFuzzer with clang: FUZZ=<target> FUZZ_TIME=<seconds, 60>'
	@echo '  examples       build examples/*.c'
	@echo '  bench          run the benchmarks (SHORT=1 for a quick pass)'
	@echo '  install        install under PREFIX (DESTDIR, libdir, includedir, mandir honoured)'
	@echo '  uninstall      remove what install put there'
	@echo '  deps           install missing Debian packages (as root) or print the command'
	@echo '  clean          remove build/'
	@echo 'Variables: V=1 (show commands), SAN=address,undefined | SAN=thread,'
	@echo '  CFLAGS/LDFLAGS (appended to the project flags), PREFIX, DESTDIR, TESTS=name,...,'
	@echo '  FUZZ_RUNS=<mutations per fuzz target in check-fuzz>'
