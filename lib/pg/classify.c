/* lib/pg/classify.c — keel_pg_classify(): can this SQL run on a replica?
 *
 * A small lexer that knows what it must not look into (comments, nested
 * block comments, strings with their escapes, quoted names, dollar
 * quotes) yields words and parentheses; each statement is then judged by
 * its first word and, for the read kinds, by words that betray a write.
 * Anything not recognised as a read is a write: sending a read to the
 * primary costs a little load, sending a write to a replica fails.
 */
#include <string.h>

#include "pg_int.h"

typedef enum kind { T_END, T_WORD, T_LPAREN, T_RPAREN, T_SEMI, T_OTHER } kind;

typedef struct tok {
    kind k;
    const char *s;
    size_t n;
} tok;

static bool word_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '$' || c >= 0x80;
}

static bool word_start(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static const char *skip_space_and_comments(const char *p)
{
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f' || *p == '\v')
            p++;
        if (p[0] == '-' && p[1] == '-') {
            while (*p && *p != '\n')
                p++;
        } else if (p[0] == '/' && p[1] == '*') { /* they nest in PostgreSQL */
            int depth = 0;
            do {
                if (p[0] == '/' && p[1] == '*') {
                    depth++;
                    p += 2;
                } else if (p[0] == '*' && p[1] == '/') {
                    depth--;
                    p += 2;
                } else {
                    p++;
                }
            } while (*p && depth > 0);
        } else {
            return p;
        }
    }
}

/* Past a quoted run that opened at p[0] == q; a doubled quote stays
 * inside, and with `backslash` so does an escaped character. */
static const char *skip_quoted(const char *p, char q, bool backslash)
{
    for (p++; *p; p++) {
        if (backslash && *p == '\\' && p[1]) {
            p++;
        } else if (*p == q) {
            if (p[1] != q)
                return p + 1;
            p++;
        }
    }
    return p;
}

/* A dollar quote $tag$...$tag$ at p, or NULL if p does not open one. */
static const char *skip_dollar(const char *p)
{
    const char *t = p + 1;
    if (*t != '$' && !word_start((unsigned char)*t))
        return NULL;
    while (*t != '$' && word_char((unsigned char)*t))
        t++;
    if (*t != '$')
        return NULL;
    size_t taglen = (size_t)(t - p + 1);
    for (const char *q = t + 1; *q; q++)
        if (*q == '$' && strncmp(q, p, taglen) == 0)
            return q + taglen;
    return p + strlen(p);
}

static tok next(const char **pp)
{
    const char *p = skip_space_and_comments(*pp);
    tok t = {T_OTHER, p, 1};
    unsigned char c = (unsigned char)*p;
    if (!c) {
        t.k = T_END;
        t.n = 0;
    } else if (c == '\'') {
        p = skip_quoted(p, '\'', false);
        t.n = (size_t)(p - t.s);
    } else if (c == '"') {
        p = skip_quoted(p, '"', false);
        t.n = (size_t)(p - t.s);
    } else if (c == '$') {
        const char *end = skip_dollar(p);
        for (p = end ? end : p + 1; !end && *p >= '0' && *p <= '9';)
            p++; /* $1: a parameter */
        t.n = (size_t)(p - t.s);
    } else if (word_start(c)) {
        while (word_char((unsigned char)*p))
            p++;
        t.n = (size_t)(p - t.s);
        /* E'...' (backslash escapes), B'', X'', N'', U&'' are strings */
        if (*p == '\'' && t.n == 1) {
            bool esc = c == 'e' || c == 'E';
            p = skip_quoted(p, '\'', esc);
            t.n = (size_t)(p - t.s);
        } else if (t.n == 1 && (c == 'u' || c == 'U') && p[0] == '&' && (p[1] == '\'' || p[1] == '"')) {
            p = skip_quoted(p + 1, p[1], false);
            t.n = (size_t)(p - t.s);
        } else {
            t.k = T_WORD;
        }
    } else {
        t.k = c == '(' ? T_LPAREN : c == ')' ? T_RPAREN : c == ';' ? T_SEMI : T_OTHER;
        p++;
    }
    *pp = p;
    return t;
}

static bool is(tok t, const char *w)
{
    size_t n = strlen(w);
    if (t.k != T_WORD || t.n != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = t.s[i];
        if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != w[i])
            return false;
    }
    return true;
}

static bool is_any(tok t, const char *const *words)
{
    for (; *words; words++)
        if (is(t, *words))
            return true;
    return false;
}

/* Functions that write, or that fail during recovery. */
static bool write_function(tok t)
{
    static const char *const fns[] = {
        "nextval", "setval", "txid_current", "pg_current_xact_id", "pg_notify",
        "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
        "pg_switch_wal", "pg_create_restore_point", NULL,
    };
    if (t.k != T_WORD)
        return false;
    if (t.n > 3 && (t.s[0] == 'l' || t.s[0] == 'L') && (t.s[1] == 'o' || t.s[1] == 'O') &&
        t.s[2] == '_')
        return true; /* the large object functions */
    return is_any(t, fns);
}

static const char *const dml[] = {"insert", "update", "delete", "merge", "into", NULL};

/* The rest of a read statement, to its end: does anything in it write? */
static bool body_writes(const char **pp)
{
    static const char *const locks[] = {"share", "no", "key", NULL}; /* FOR SHARE, FOR NO KEY.. */
    tok prev = {T_END, NULL, 0};
    for (;;) {
        tok t = next(pp);
        if (t.k == T_END || t.k == T_SEMI)
            return false;
        if (is_any(t, dml) || (is(prev, "for") && is_any(t, locks)) ||
            (t.k == T_LPAREN && write_function(prev)))
            return true;
        prev = t;
    }
}

/* Skips to the end of the statement. */
static void skip_statement(const char **pp)
{
    tok t;
    do
        t = next(pp);
    while (t.k != T_END && t.k != T_SEMI);
}

static const char *const reads[] = {"select", "values", "table", "with", "show", NULL};

/* One statement: 1 a read, 0 a write, -1 empty. */
static int statement(const char **pp)
{
    tok t = next(pp);
    while (t.k == T_LPAREN) /* (SELECT ...) UNION (SELECT ...) */
        t = next(pp);
    if (t.k == T_END || t.k == T_SEMI)
        return -1;
    if (is(t, "explain")) { /* EXPLAIN [ANALYZE] [VERBOSE] | (options) statement */
        t = next(pp);
        if (t.k == T_LPAREN) {
            int depth = 1;
            while (depth > 0 && t.k != T_END) {
                t = next(pp);
                depth += t.k == T_LPAREN ? 1 : t.k == T_RPAREN ? -1 : 0;
            }
            t = next(pp);
        }
        while (is(t, "analyze") || is(t, "analyse") || is(t, "verbose"))
            t = next(pp);
        while (t.k == T_LPAREN)
            t = next(pp);
    }
    if (is_any(t, reads))
        return body_writes(pp) ? 0 : 1;
    if (is(t, "copy")) { /* COPY ... TO reads; FROM writes */
        int depth = 0;
        for (;;) {
            t = next(pp);
            if (t.k == T_END || t.k == T_SEMI)
                return 0;
            if (is_any(t, dml)) /* COPY (INSERT ... RETURNING) TO */
                return 0;
            depth += t.k == T_LPAREN ? 1 : t.k == T_RPAREN ? -1 : 0;
            if (depth == 0 && (is(t, "to") || is(t, "from")))
                break;
        }
        return is(t, "to") ? !body_writes(pp) : 0;
    }
    skip_statement(pp);
    return 0;
}

KEEL_API keel_pg_mode keel_pg_classify(const char *sql)
{
    if (!sql)
        return KEEL_PG_WRITE;
    const char *p = sql;
    bool any = false;
    while (*skip_space_and_comments(p)) {
        int r = statement(&p);
        if (r == 0)
            return KEEL_PG_WRITE;
        any |= r == 1;
    }
    return any ? KEEL_PG_READ : KEEL_PG_WRITE;
}
